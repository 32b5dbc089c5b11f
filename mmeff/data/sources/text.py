"""Your own text: .txt/.md/.rst files or JSONL ({"text": ...} per line) packed as LM shards (-o src=PATH)."""

from __future__ import annotations

from pathlib import Path

from mmeff.data.sources import SOURCES


@SOURCES.register("text", summary=__doc__)
def build(
    out_dir: Path,
    src: str,
    seq_len: int = 256,
    tokenizer: str | None = None,
    val: float = 0.05,
    test: float = 0.05,
    maxcount: int = 1000,
) -> dict[str, int]:
    """Pack the documents under `src` (a file or folder) into text shards, split by document name."""
    from mmeff.data.text import read_documents, write_text_shards
    from mmeff.encoders.text import load_tokenizer

    return write_text_shards(
        read_documents(src), out_dir, load_tokenizer(tokenizer) if tokenizer else None,
        seq_len=seq_len, val=val, test=test, maxcount=maxcount,
    )
