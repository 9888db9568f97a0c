"""Regenerate chat_messages.parquet from chat_messages.jsonl (run from anywhere):

    .venv/bin/python tests/assets/data/make_parquet.py

Takes the first four conversations (no tools: their nested arguments would be widened into one
struct type by Arrow). Arrow gives every message every key seen in the column, so messages without
`reasoning_content` come back with it set to null — what the reader must drop.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent


def main() -> None:
    lines = (HERE / "chat_messages.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[:4]]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, HERE / "chat_messages.parquet", compression="zstd")
    print(f"wrote {table.num_rows} rows: {table.schema}")


if __name__ == "__main__":
    main()
