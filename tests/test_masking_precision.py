"""Precision: library source code holds no real secrets, so every mask there is a false one.

Runs the built-in pack over the ``.py`` files of the installed dependencies (sorted, capped
at about 30 MB) and requires fewer than one false mask per MB. If this fails, fix the rule
that floods (see the printed breakdown), not the threshold.
"""

from __future__ import annotations

import collections
import sysconfig
from pathlib import Path

import pytest

from proxy.masking import Masker

CAP = 30 * 1024 * 1024


def corpus() -> list[Path]:
    site = Path(sysconfig.get_paths()["purelib"])
    files, total = [], 0
    for path in sorted(site.rglob("*.py")):
        if total >= CAP:
            break
        files.append(path)
        total += path.stat().st_size
    return files


def test_false_masks_per_mb_on_dependency_sources() -> None:
    files = corpus()
    if not files:
        pytest.skip("no installed sources to scan")
    masker = Masker(hmac_key=b"precision")
    total, by_rule = 0, collections.Counter()
    for path in files:
        data = path.read_bytes()
        total += len(data)
        for span in masker.scan(data):
            by_rule[span.rule] += 1
    megabytes = total / 1e6
    rate = sum(by_rule.values()) / megabytes
    print(
        f"\nmasking precision: {sum(by_rule.values())} masks in {megabytes:.1f} MB "
        f"= {rate:.2f} per MB; by rule: {dict(by_rule)}"
    )
    assert megabytes > 5, "too little source to measure precision"
    assert rate < 1.0, f"{rate:.2f} false masks per MB: {dict(by_rule)}"
