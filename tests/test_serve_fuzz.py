"""The Serve app's HTTP API under hostile input, over HTTP on 127.0.0.1 (the apps of tests/test_serve.py).

First schemathesis fuzzes `/v1/predict` and `/v1/predict/batch` from the app's own OpenAPI document (bodies
that follow the schema and bodies that break it), then `HOSTILE` sends what no schema describes: bytes that
are not UTF-8, duplicate keys, huge numbers, multi-megabyte strings, truncated bodies, wrong content types,
broken CSV files, and bodies whose Content-Length lies. Every answer is a documented 2xx or a JSON 4xx in the
`serving.ErrorOut` shape whose message names what is wrong; never a 5xx, never a plain-text page.
"""

import socket
from dataclasses import dataclass

import pytest
import requests
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, negative_data_rejection, response_schema_conformance, status_code_conformance)
from test_serve import checkpoints, served  # noqa: F401 (the fixtures: the same apps, started once per module)

from app.serving import ErrorOut

pytestmark = pytest.mark.integration

HEADER = b"id,prompt,response_a,response_b\n"
ROW = b'1,"[""Hi""]","[""Hello""]","[""Hey""]"\n'
PAIR = b'"prompt": "p", "response_a": "a", "response_b": "b"'
JSON = {"Content-Type": "application/json"}
CSV = {"Content-Type": "text/csv"}


@schemathesis.check
def errors_are_json(ctx, response, case) -> None:
    """A 4xx is JSON in the ErrorOut shape, with a message."""
    if response.status_code >= 400:
        assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.text[:200]
        assert ErrorOut.model_validate_json(response.content).error.message


@pytest.fixture(scope="module")
def api_schema(served):  # noqa: F811
    return schemathesis.openapi.from_url(f"{served['ens']}/openapi.json", timeout=30)


# Cases are drawn from each operation's strategy (schemathesis' lazy `from_fixture` loader breaks on pytest 9's
# nodes): positive ones follow the document, negative ones break it and must get a 4xx.
@pytest.mark.parametrize("mode", list(GenerationMode), ids=str)
@pytest.mark.parametrize("path", ["/v1/predict", "/v1/predict/batch"])
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_the_predict_endpoints_from_the_openapi_document(api_schema, served, path, mode, data):  # noqa: F811
    case = data.draw(api_schema[path]["POST"].as_strategy(generation_mode=mode))
    case.call_and_validate(base_url=served["ens"], timeout=60, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
        negative_data_rejection, errors_are_json])


@dataclass(frozen=True)
class Hostile:
    name: str
    path: str  # /v1/predict or /v1/predict/batch, on the "ens" app
    body: bytes
    status: int
    says: str = ""  # in the error message
    headers: dict[str, str] | None = None


HOSTILE = [
    # not JSON, or JSON the API does not take
    Hostile("empty body", "/v1/predict", b"", 422, "not valid JSON", JSON),
    Hostile("not UTF-8", "/v1/predict", b'{"prompt": "\xff\xfe\xc3", "response_a": "a", "response_b": "b"}', 422,
            "not valid JSON", JSON),
    Hostile("truncated", "/v1/predict", b'{"pairs": [{"prompt": "p", "respo', 422, "not valid JSON", JSON),
    Hostile("quote never closed", "/v1/predict", b'{"prompt": "p, "response_a": "a", "response_b": "b}', 422,
            "not valid JSON", JSON),
    Hostile("duplicate key", "/v1/predict", b'{"prompt": "p", "prompt": "q", "response_a": "a", "response_b": "b"}',
            422, 'duplicate key "prompt"', JSON),
    Hostile("duplicate key in a pair", "/v1/predict",
            b'{"pairs": [{"id": 1, "id": 2, ' + PAIR + b"}]}", 422, 'duplicate key "id"', JSON),
    Hostile("top-level array", "/v1/predict", b"[{" + PAIR + b"}]", 422, "must be a JSON object", JSON),
    Hostile("top-level null", "/v1/predict", b"null", 422, "must be a JSON object", JSON),
    Hostile("deeply nested", "/v1/predict", b"[" * 100_000 + b"]" * 100_000, 422, "nested", JSON),
    Hostile("deeply nested turn", "/v1/predict", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b', "response_a": "a", '
            b'"response_b": "b"}', 422, "nested", JSON),
    Hostile("id 1e999", "/v1/predict", b'{"id": 1e999, ' + PAIR + b"}", 422, "got a JSON number", JSON),
    Hostile("id NaN", "/v1/predict", b'{"id": NaN, ' + PAIR + b"}", 422, "got a JSON number", JSON),
    Hostile("tta_swap -Infinity", "/v1/predict", b'{"tta_swap": -Infinity, ' + PAIR + b"}", 422, "true, false", JSON),
    Hostile("id 10**400", "/v1/predict", b'{"id": 1' + b"0" * 400 + b", " + PAIR + b"}", 200, headers=JSON),
    Hostile("id of 5000 digits", "/v1/predict", b'{"id": 1' + b"0" * 5000 + b", " + PAIR + b"}", 422, "digits", JSON),
    Hostile("id a lone surrogate", "/v1/predict", b'{"id": "x\\ud800", ' + PAIR + b"}", 422, "surrogate", JSON),
    Hostile("text a lone surrogate and NUL", "/v1/predict",
            b'{"prompt": "\\udfff\\u0000", "response_a": "a\\u0000", "response_b": "b"}', 200, headers=JSON),
    Hostile("multi-megabyte text over the limit", "/v1/predict",
            b'{"prompt": "' + b"x" * (3 << 20) + b'", "response_a": "a", "response_b": "b"}', 413, "limit", JSON),
    # wrong content types: the body is judged by what it holds
    Hostile("JSON sent as text/csv", "/v1/predict", b"{" + PAIR + b"}", 200, headers=CSV),
    Hostile("a form", "/v1/predict", b"prompt=p&response_a=a&response_b=b", 422, "not valid JSON",
            {"Content-Type": "application/x-www-form-urlencoded"}),
    Hostile("multipart", "/v1/predict", b'--x\r\nContent-Disposition: form-data; name="prompt"\r\n\r\np\r\n--x--\r\n',
            422, "not valid JSON", {"Content-Type": "multipart/form-data; boundary=x"}),
    Hostile("JSON to the CSV endpoint", "/v1/predict/batch", b"{" + PAIR + b"}", 422, "cannot be read as a table", JSON),
    # CSV files
    Hostile("empty file", "/v1/predict/batch", b"", 422, "the uploaded file", CSV),
    Hostile("header row only", "/v1/predict/batch", HEADER, 422, "no valid rows", CSV),
    Hostile("CSV not UTF-8", "/v1/predict/batch", HEADER + b'1,"[""\xff\xfe""]","[""a""]","[""b""]"\n', 422,
            "cannot be read", CSV),
    Hostile("CSV with NUL bytes", "/v1/predict/batch", HEADER + b'1,"[""a\x00b""]","[""a""]","[""b\x00""]"\n', 422,
            "row id=1 (row 1), column prompt", CSV),  # a raw control character inside a JSON string
    Hostile("CSV with escaped NULs", "/v1/predict/batch", HEADER + b'1,"[""a\\u0000b""]","[""a""]","[""b""]"\n', 200,
            headers=CSV),
    Hostile("CSV NUL in the header", "/v1/predict/batch", b"id\x00,prompt,response_a,response_b\n" + ROW, 422,
            "missing required columns", CSV),
    Hostile("CSV quote never closed", "/v1/predict/batch", HEADER + b'1,"[""Hi""]","[""Hello""]","[""Hey\n', 422,
            "the uploaded file", CSV),
    Hostile("CSV truncated mid-row", "/v1/predict/batch", HEADER + ROW + b'2,"[""Hi""]","[', 422,
            "the uploaded file", CSV),
    Hostile("CSV duplicate columns", "/v1/predict/batch", b"id,prompt,prompt,response_a,response_b\n1,a,b,c,d\n", 422,
            "the uploaded file", CSV),
    Hostile("CSV deeply nested cell", "/v1/predict/batch",
            HEADER + b'1,"' + b"[" * 5000 + b"]" * 5000 + b'","[""a""]","[""b""]"\n', 422, "column prompt", CSV),
    Hostile("CSV number of 5000 digits in a cell", "/v1/predict/batch",
            HEADER + b'1,"[1' + b"0" * 5000 + b']","[""a""]","[""b""]"\n', 422, "column prompt", CSV),
    Hostile("CSV multi-megabyte cell under the limit", "/v1/predict/batch",
            HEADER + b'1,"[""' + b"word " * (600_000) + b'""]","[""a""]","[""b""]"\n', 200, headers=CSV),
    Hostile("CSV a bare binary blob", "/v1/predict/batch", bytes(range(256)) * 64, 422, "the uploaded file",
            {"Content-Type": "application/octet-stream"}),
]


def assert_answer(response: requests.Response, status: int, says: str) -> None:
    """The expected status; a 4xx is JSON in the ErrorOut shape and its message says what is wrong."""
    assert response.status_code == status, response.text[:300]
    if status >= 400:
        assert response.headers["content-type"].startswith("application/json"), response.text[:300]
        message = ErrorOut.model_validate_json(response.content).error.message
        assert says in message, message


@pytest.mark.parametrize("hostile", HOSTILE, ids=[h.name for h in HOSTILE])
def test_hostile_bodies_get_a_json_4xx_naming_the_fault(served, hostile):  # noqa: F811
    response = requests.post(f"{served['ens']}{hostile.path}", data=hostile.body, headers=hostile.headers, timeout=120)
    assert_answer(response, hostile.status, hostile.says)


def test_a_bad_query_parameter_and_a_wrong_method_get_json_errors(served):  # noqa: F811
    bad = requests.post(f"{served['ens']}/v1/predict/batch?tta_swap=maybe", data=HEADER + ROW, timeout=60)
    assert_answer(bad, 422, "boolean")
    assert ErrorOut.model_validate_json(bad.content).error.path == "tta_swap"
    assert_answer(requests.get(f"{served['ens']}/v1/predict", timeout=30), 405, "Method Not Allowed")
    assert_answer(requests.get(f"{served['ens']}/v1/nothing", timeout=30), 404, "Not Found")


def raw_request(port: int, head: str, body: bytes, half_close: bool = False) -> bytes:
    """Send a hand-written HTTP/1.1 request; what the server answers before it closes (or 5 s pass)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        if half_close:
            connection.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while piece := connection.recv(65536):
                answer += piece
        except TimeoutError:
            pass
    return answer


@pytest.mark.parametrize("length, body, status", [
    (70_000_000, b"", b"413"),  # declares more than max_file_bytes: refused before any of it is read
    (10, b"{" + PAIR + b"}", b"422"),  # declares fewer bytes than it sends: the first 10 are not JSON
])
def test_a_content_length_that_lies_gets_a_json_4xx(served, length, body, status):  # noqa: F811
    head = (f"POST /ens/v1/predict/batch HTTP/1.1\nHost: 127.0.0.1\nContent-Type: text/csv\n"
            f"Content-Length: {length}\nConnection: close\n")
    answer = raw_request(served["port"], head, body)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status in status_line, answer[:300]
    assert b"application/json" in rest.split(b"\r\n\r\n")[0].lower() and b'"error"' in rest, answer[:300]


def test_a_body_shorter_than_its_content_length_leaves_the_app_serving(served):  # noqa: F811
    head = (f"POST /ens/v1/predict HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
            f"Content-Length: 1000\n")
    raw_request(served["port"], head, b"{" + PAIR, half_close=True)  # the client gives up: no answer to judge
    assert requests.post(f"{served['ens']}/v1/predict", data=b"{" + PAIR + b"}", headers=JSON,
                         timeout=60).status_code == 200


def test_the_app_is_ready_after_the_hostile_input(served):  # noqa: F811
    ready = requests.get(f"{served['ens']}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["ready"] is True
