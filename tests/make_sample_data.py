"""Generate the sample and broken data files under tests/data/ (deterministic; rerun after editing).

    python tests/make_sample_data.py            # writes tests/data/{sample,formats,broken}
    python tests/make_sample_data.py OUT_DIR    # writes elsewhere (the tests compare against the committed files)

The sample reviews are short template sentences (hotel / laptop / book) whose sentiment is carried by plain
words (干净/满意 vs 脏/失望), so a tiny model can learn them in a demo run. Labels are balanced in every split.
"""

from __future__ import annotations

import csv
import io
import json
import random
import sys
from itertools import permutations
from pathlib import Path

SEED = 20240607
PER_GROUP = {"train": 40, "dev": 10, "test": 10}  # per (domain, label): 6 groups -> 240 / 60 / 60

DOMAINS = {
    "hotel": {
        "openers": ["", "这家酒店", "入住两晚，", "出差住在这里，"],
        1: ("房间很干净 服务很热情 早餐很丰盛 位置很方便 床很舒服 前台很耐心 环境很安静 性价比很高".split(),
            ["下次还会再来。", "推荐大家入住。", "非常满意！", "总体很好, 五星!"]),
        0: ("房间很脏 服务态度很差 早餐太难吃 隔音很差 床单有异味 前台很冷漠 热水时有时无 价格太贵".split(),
            ["再也不会来了。", "非常失望。", "不推荐入住。", "差评, 一星!"]),
    },
    "laptop": {
        "openers": ["", "这台笔记本", "用了一个月，", "刚收到货，"],
        1: ("屏幕很清晰 运行速度快 电池很耐用 键盘手感好 散热很好 外观漂亮 做工精致 音质不错".split(),
            ["很满意这次购买。", "推荐购买！", '朋友都说"物超所值"。', "好评！"]),
        0: ("屏幕有坏点 运行很卡 电池不耐用 键盘松动 发热严重 风扇噪音大 做工粗糙 音质很差".split(),
            ["后悔买了。", "非常失望。", "不推荐购买。", '所谓"高性能"根本是假的。']),
    },
    "book": {
        "openers": ["", "这本书", "读完以后觉得", "给孩子买的，"],
        1: ("内容很精彩 印刷很清晰 故事很感人 文笔很好 翻译很流畅 插图很漂亮 纸张很好 观点很新颖".split(),
            ["强烈推荐！", "值得一读。", "很满意。", "好书, 收藏了!"]),
        0: ("内容很空洞 印刷很模糊 故事很拖沓 错别字很多 翻译很生硬 插图很粗糙 纸张很差 观点很陈旧".split(),
            ["浪费钱。", "很失望。", "不推荐。", "差, 别买!"]),
    },
}


def make_splits(seed: int = SEED) -> dict[str, list[tuple[int, str]]]:
    """Distinct template reviews, balanced by domain and label, no text shared between splits."""
    rng = random.Random(seed)
    splits: dict[str, list[tuple[int, str]]] = {s: [] for s in PER_GROUP}
    for domain in DOMAINS.values():
        for label in (1, 0):
            clauses, endings = domain[label]
            pool = [o + a + "，" + b + "，" + e for o in domain["openers"] for a, b in permutations(clauses, 2)
                    for e in endings]
            picked = rng.sample(pool, sum(PER_GROUP.values()))
            for split, n in PER_GROUP.items():
                splits[split] += [(label, text) for text in picked[:n]]
                picked = picked[n:]
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def tsv(rows: list[tuple[int, str]]) -> str:
    return "label\ttext_a\n" + "".join(f"{label}\t{text}\n" for label, text in rows)


def write_formats(out: Path, rows: list[tuple[int, str]]) -> None:
    """The train examples in every supported format, with different column names and label spellings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["text", "label"])  # columns in the other order than the tsv
    writer.writerows([text, label] for label, text in rows)
    (out / "train.csv").write_text(buf.getvalue(), encoding="utf-8")
    (out / "train.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for y, t in rows), encoding="utf-8")
    objects = [json.dumps({"review": t, "labels": ["负面", "正面"][y]}, ensure_ascii=False) for y, t in rows]
    (out / "train.json").write_text("[\n" + ",\n".join(objects) + "\n]\n", encoding="utf-8")
    table = pa.table({"text": pa.array([t for _, t in rows], pa.string()),
                      "label": pa.array([y for y, _ in rows], pa.int64())})
    pq.write_table(table, out / "train.parquet")


HEADER = "label\ttext_a\n"
GOOD = ["1\t房间很干净，服务很热情。\n", "0\t屏幕有坏点，非常失望。\n", "1\t内容很精彩，值得一读。\n"]

BROKEN: dict[str, bytes] = {
    "wrong_delimiter.csv": "label;text\n1;房间很干净\n0;屏幕有坏点\n".encode(),
    "missing_label_column.tsv": ("sentiment\ttext_a\n" + "".join(GOOD)).encode(),
    "missing_text_column.tsv": ("label\tcomment\n" + "".join(GOOD)).encode(),
    "extra_fields.tsv": (HEADER + GOOD[0] + "0\t屏幕有坏点\t非常失望。\n" + GOOD[2]).encode(),
    "unknown_label_2.tsv": (HEADER + GOOD[0] + GOOD[1] + "2\t中规中矩的一本书。\n").encode(),
    "unknown_label_pos_word.tsv": (HEADER + "good\t房间很干净。\n" + GOOD[1]).encode(),
    "empty_label.tsv": (HEADER + GOOD[0] + "\t还可以吧。\n" + GOOD[2]).encode(),
    "padded_label.tsv": (HEADER + GOOD[0] + "    0\t隔音很差，非常失望。\n" + GOOD[2]).encode(),
    "empty_text.tsv": (HEADER + "1\t\n" + GOOD[1]).encode(),
    "whitespace_text.tsv": (HEADER + GOOD[0] + GOOD[1] + "0\t  \u3000 \n").encode(),
    "bom.tsv": b"\xef\xbb\xbf" + (HEADER + "".join(GOOD)).encode(),
    "crlf.tsv": (HEADER + "".join(GOOD)).replace("\n", "\r\n").encode(),
    "non_utf8.tsv": (HEADER + GOOD[0]).encode() + "0\t房间很脏，非常失望。\n".encode("gbk") + GOOD[2].encode(),
    "truncated_last_line.tsv": (HEADER + GOOD[0] + GOOD[1] + "1").encode(),
    "empty.tsv": b"",
    "unknown.xml": "<reviews><review label=\"1\">房间很干净</review></reviews>\n".encode(),
    "bad_json.jsonl": ('{"text": "房间很干净", "label": 1}\n{"text": "房间很脏", "label": 0\n'
                       '{"text": "内容很精彩", "label": 1}\n').encode(),
    "no_test_split/train.tsv": (HEADER + "".join(GOOD)).encode(),
    "no_test_split/dev.tsv": (HEADER + "".join(GOOD)).encode(),
}


def main(root: Path) -> None:
    splits = make_splits()
    for sub in ("sample", "formats", "broken/no_test_split"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (root / "sample" / f"{split}.tsv").write_text(tsv(rows), encoding="utf-8")
    write_formats(root / "formats", splits["train"])
    for name, content in BROKEN.items():
        (root / "broken" / name).write_bytes(content)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "data")
