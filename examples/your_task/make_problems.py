"""Writes problems.parquet: your own prompts in verl's format, the one ReasoningBandit-v0's ``source: parquet`` reads.

    python examples/your_task/make_problems.py

Columns: ``data_source`` (str), ``prompt`` (a list of chat messages), ``reward_model`` ({ground_truth: str}) and,
optionally, ``extra_info`` (a struct; its fields reach the reward function as columns too).
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ITEMS = [("apples", 3, 4), ("pencils", 12, 7), ("coins", 25, 17), ("books", 8, 9), ("cards", 40, 13),
         ("stamps", 6, 6), ("shells", 31, 22), ("marbles", 14, 28), ("beads", 50, 35), ("rocks", 9, 2),
         ("leaves", 18, 5), ("buttons", 27, 16), ("seeds", 33, 41), ("nails", 7, 19), ("cups", 11, 24),
         ("spoons", 21, 8)]


def main() -> None:
    rows = [{"data_source": "my_word_problems",
             "prompt": [{"role": "user", "content": f"Ann has {a} {thing} and Bob gives her {b} more. How many "
                                                    f"{thing} does Ann have now? End with the number."}],
             "reward_model": {"ground_truth": str(a + b)},
             "extra_info": {"index": i}} for i, (thing, a, b) in enumerate(ITEMS)]
    pq.write_table(pa.Table.from_pylist(rows), Path(__file__).with_name("problems.parquet"))


if __name__ == "__main__":
    main()
