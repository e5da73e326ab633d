"""A fake tokenizer for exact token-budget tests: one token per whitespace word, so a test reads its output."""


class WordTokenizer:
    """One token per whitespace word, ids stable per word; [CLS]=1 before and [SEP]=2 after a text."""

    def __init__(self):
        self.vocab = {"[CLS]": 1, "[SEP]": 2}

    def __call__(self, texts, add_special_tokens=True, verbose=True):
        ids = [[self.vocab.setdefault(word, len(self.vocab) + 1) for word in text.split()] for text in texts]
        return {"input_ids": [[1, *row, 2] if add_special_tokens else row for row in ids]}

    def words(self, ids):
        inverse = {v: k for k, v in self.vocab.items()}
        return [inverse[i] for i in ids]


def words(n, stem):
    """`n` distinct words: "p0 p1 p2 ..."."""
    return " ".join(f"{stem}{i}" for i in range(n))
