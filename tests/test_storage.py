"""app/storage.py on a local folder and on S3 (moto on 127.0.0.1): one set of calls for both."""

import pyarrow.fs as pafs
import pytest

from app import storage


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    return str(tmp_path / "store") if request.param == "local" else request.getfixturevalue("s3")()


def test_round_trip(folder, tmp_path):
    storage.write_json(storage.join(folder, "run", "summary.json"), {"best": 1.5})
    assert storage.read_json(storage.join(folder, "run", "summary.json")) == {"best": 1.5}
    assert storage.exists(storage.join(folder, "run", "summary.json"))
    assert storage.is_dir(storage.join(folder, "run"))
    assert storage.list_dir(storage.join(folder, "run")) == ["summary.json"]
    assert storage.list_dir(storage.join(folder, "absent")) == []
    with pytest.raises(FileNotFoundError, match="absent.json"):
        storage.read_bytes(storage.join(folder, "absent.json"))
    local = tmp_path / "local"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "w.bin").write_bytes(b"\0\1")
    storage.upload_dir(str(local), storage.join(folder, "up"))
    assert storage.read_bytes(storage.join(folder, "up", "sub", "w.bin")) == b"\0\1"
    if storage.is_uri(folder):
        back = storage.download_dir(storage.join(folder, "up"), str(tmp_path / "back"))
        assert (tmp_path / "back" / "sub" / "w.bin").read_bytes() == b"\0\1" and back == str(tmp_path / "back")
    storage.delete_dir(storage.join(folder, "up"))
    assert not storage.exists(storage.join(folder, "up", "sub", "w.bin"))


def test_uri_of_restores_the_scheme_that_pyarrow_drops(s3):
    uri = s3() + "/runs/x/epoch_000"
    filesystem, path = storage.resolve(uri)
    assert not path.startswith("s3://")
    assert storage.uri_of(filesystem, path) == uri
    assert storage.uri_of(pafs.LocalFileSystem(), "/runs/x") == "/runs/x"
