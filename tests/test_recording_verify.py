"""The verifier: every kind of tampering is caught and pinned to the first bad seq."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_recording_support import lines_of, only_file, record_session, recorder, records_of

from proxy.recording import format as fmt
from proxy.recording.cli import run_verify
from proxy.recording.files import list_recordings
from proxy.recording.keys import Signer, public_pem
from proxy.recording.verify import verify

Lines = list[bytes]


async def _recording(tmp_path: Path, **options: object) -> Path:
    rec = recorder(tmp_path, checkpoint_every=8, **options)  # type: ignore[arg-type]
    await rec.open()
    await record_session(rec, requests=6)
    await rec.close()
    return tmp_path / "rec"


def _middle_request(lines: Lines) -> int:
    """Index of a request line in the middle (not next to a checkpoint)."""
    kinds = [json.loads(line)["kind"] for line in lines]
    candidates = [
        n
        for n, kind in enumerate(kinds)
        if kind == "request" and "checkpoint" not in (kinds[n - 1], kinds[n + 1])
    ]
    return candidates[len(candidates) // 2]


def _flip(line: bytes, pos: int) -> bytes:
    value = line[pos] ^ 0x01
    if value in (0x0A, 0x0D):
        value = line[pos] ^ 0x02
    return line[:pos] + bytes([value]) + line[pos + 1 :]


def flip_in_body(lines: Lines, n: int) -> tuple[Lines, int]:
    pos = lines[n].index(b"hello") + 1
    return [*lines[:n], _flip(lines[n], pos), *lines[n + 1 :]], n + 1


def flip_middle_byte(lines: Lines, n: int) -> tuple[Lines, int]:
    return [*lines[:n], _flip(lines[n], len(lines[n]) // 2), *lines[n + 1 :]], n + 1


def delete_line(lines: Lines, n: int) -> tuple[Lines, int]:
    return [*lines[:n], *lines[n + 1 :]], n + 1


def duplicate_line(lines: Lines, n: int) -> tuple[Lines, int]:
    return [*lines[: n + 1], lines[n], *lines[n + 1 :]], n + 2


def swap_lines(lines: Lines, n: int) -> tuple[Lines, int]:
    return [*lines[:n], lines[n + 1], lines[n], *lines[n + 2 :]], n + 1


def cut_line_keep_newline(lines: Lines, n: int) -> tuple[Lines, int]:
    return [*lines[:n], lines[n][: len(lines[n]) // 2] + b"\n", *lines[n + 1 :]], n + 1


def cut_line_join_next(lines: Lines, n: int) -> tuple[Lines, int]:
    return [*lines[:n], lines[n][: len(lines[n]) // 2], *lines[n + 1 :]], n + 1


def _resign(line: bytes, signer: Signer) -> bytes:
    record = json.loads(line)
    record.pop("sig")
    record["key_id"] = signer.key_id
    forged = fmt.make_checkpoint(
        record["seq"],
        record["ts"],
        record["prev"],
        from_seq=record["from_seq"],
        chain=record["chain"],
        key_id=signer.key_id,
        sign=signer.sign,
    )
    return fmt.encode_record(forged)


def checkpoint_by_another_key(lines: Lines, _n: int) -> tuple[Lines, int]:
    n = next(i for i, line in enumerate(lines) if b'"kind":"checkpoint"' in line)
    return [*lines[:n], _resign(lines[n], Signer.generate()), *lines[n + 1 :]], n + 1


def checkpoint_signature_swapped(lines: Lines, _n: int) -> tuple[Lines, int]:
    """Same key id, signature made by another key."""
    n = next(i for i, line in enumerate(lines) if b'"kind":"checkpoint"' in line)
    record = json.loads(lines[n])
    other = json.loads(_resign(lines[n], Signer.generate()))
    record["sig"] = other["sig"]
    return [*lines[:n], fmt.encode_record(record), *lines[n + 1 :]], n + 1


TAMPERS: list[Callable[[Lines, int], tuple[Lines, int]]] = [
    flip_in_body,
    flip_middle_byte,
    delete_line,
    duplicate_line,
    swap_lines,
    cut_line_keep_newline,
    cut_line_join_next,
    checkpoint_by_another_key,
    checkpoint_signature_swapped,
]


@pytest.mark.asyncio
async def test_an_intact_recording_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = await _recording(tmp_path)
    assert run_verify([str(directory)]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and only_file(directory).name in out
    [result] = verify([directory])
    assert result.state == "verified" and result.ok and result.checkpoints >= 2


@pytest.mark.asyncio
@pytest.mark.parametrize("tamper", TAMPERS, ids=lambda t: t.__name__)
async def test_tampering_is_caught_at_the_first_bad_seq(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tamper: Callable[[Lines, int], tuple[Lines, int]],
) -> None:
    directory = await _recording(tmp_path)
    path = only_file(directory)
    lines = lines_of(path)
    changed, bad_seq = tamper(lines, _middle_request(lines))
    path.write_bytes(b"".join(changed))
    assert run_verify([str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}: tampered at seq {bad_seq}:" in out, out
    [result] = verify([directory])
    assert (result.state, result.first_bad_seq) == ("tampered", bad_seq)


@pytest.mark.asyncio
async def test_a_pinned_key_catches_a_fully_re_signed_forgery(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rewriting a record, re-chaining and re-signing everything (and replacing the
    .pub beside it) fools a verifier that trusts the directory, not one pinning the key."""
    directory = await _recording(tmp_path)
    path = only_file(directory)
    genuine_pub = tmp_path / "genuine.pub"
    genuine_pub.write_bytes((directory / "recording-key.pub").read_bytes())
    forger = Signer.generate()
    records = records_of(path)
    records[5]["reason"] = "nothing to see"
    prev, out = fmt.GENESIS, []
    for record in records:
        record["prev"] = prev
        if record["kind"] == "checkpoint":
            record["head"] = prev
            record.pop("sig")
            record["key_id"] = forger.key_id
            record = fmt.make_checkpoint(
                record["seq"],
                record["ts"],
                prev,
                from_seq=record["from_seq"],
                chain=record["chain"],
                key_id=forger.key_id,
                sign=forger.sign,
            )
        line = fmt.encode_record(record)
        out.append(line)
        prev = fmt.line_hash(line)
    path.write_bytes(b"".join(out))
    (directory / "recording-key.pub").write_bytes(public_pem(forger.public_key))
    assert run_verify([str(path)]) == 0
    assert run_verify([str(path)], public_key=str(genuine_pub)) == 1
    first_checkpoint = next(r["seq"] for r in records if r["kind"] == "checkpoint")
    assert f"tampered at seq {first_checkpoint}" in capsys.readouterr().out


@pytest.mark.asyncio
async def test_another_pinned_key_fails_every_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = await _recording(tmp_path)
    other = tmp_path / "other.pub"
    other.write_bytes(public_pem(Ed25519PrivateKey.generate().public_key()))
    assert run_verify([str(directory)], public_key=str(other)) == 1
    assert "unknown key" in capsys.readouterr().out


@pytest.mark.asyncio
async def test_bad_usage_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = await _recording(tmp_path)
    assert run_verify([]) == 2
    assert run_verify([str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key")
    assert run_verify([str(directory)], public_key=str(junk)) == 2
    assert run_verify([str(directory)], public_key=str(tmp_path / "nope.pub")) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_verify([str(empty)]) == 2


@pytest.mark.asyncio
async def test_records_after_the_last_checkpoint_are_unsigned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = await _recording(tmp_path)
    path = only_file(directory)
    lines = lines_of(path)
    assert b'"kind":"checkpoint"' in lines[-1]
    path.write_bytes(b"".join(lines[:-1]))  # a crash before the final checkpoint
    assert run_verify([str(path)]) == 1
    out = capsys.readouterr().out
    last_checkpoint = max(r["seq"] for r in records_of(path) if r["kind"] == "checkpoint")
    assert f"unsigned from seq {last_checkpoint + 1}" in out
    [result] = verify([path])
    assert result.state == "unsigned" and result.first_bad_seq is None


@pytest.mark.asyncio
async def test_a_cut_at_the_end_of_the_newest_file_is_a_torn_tail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = await _recording(tmp_path)
    path = only_file(directory)
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    assert run_verify([str(directory)]) == 1
    [result] = verify([directory])
    assert result.state == "torn tail"
    assert result.first_bad_seq == records_of_prefix(data)[-1]["seq"]


def records_of_prefix(data: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in data.splitlines()]


@pytest.mark.asyncio
async def test_rotation_keeps_one_chain_across_files(tmp_path: Path) -> None:
    rec = recorder(tmp_path, rotate_bytes=2500, checkpoint_every=1000)
    await rec.open()
    for n in range(4):
        await record_session(rec, f"s{n}", requests=3)
    await rec.close()
    files = list_recordings(tmp_path / "rec")
    assert len(files) >= 4
    results = verify([tmp_path / "rec"])
    assert [r.state for r in results] == ["verified"] * len(files)
    assert run_verify([str(tmp_path / "rec")]) == 0
    seqs: list[int] = []
    for before, after in itertools.pairwise(files):
        first = records_of(after)[0]
        assert first["kind"] == "recorder.file" and first["reason"] == "rotation"
        assert first["prev_file"] == before.name and first["file"] == after.name
        assert first["prev"] == fmt.line_hash(lines_of(before)[-1])
        assert records_of(before)[-1]["kind"] == "checkpoint"
    for path in files:
        seqs.extend(r["seq"] for r in records_of(path))
    assert seqs == list(range(1, len(seqs) + 1))


@pytest.mark.asyncio
async def test_files_are_checked_against_each_other(tmp_path: Path) -> None:
    rec = recorder(tmp_path, rotate_bytes=2500)
    await rec.open()
    for n in range(4):
        await record_session(rec, f"s{n}", requests=3)
    await rec.close()
    files = list_recordings(tmp_path / "rec")
    # Drop the last records (its final checkpoint included) of a middle file.
    victim = files[1]
    victim.write_bytes(b"".join(lines_of(victim)[:-2]))
    results = {r.path.name: r for r in verify([tmp_path / "rec"])}
    assert results[victim.name].state == "unsigned"
    follower = results[files[2].name]
    assert follower.state == "tampered"
    assert follower.first_bad_seq == records_of(files[2])[0]["seq"] - 2
    # A whole middle file deleted while older ones remain.
    files[1].unlink()
    results = {r.path.name: r for r in verify([tmp_path / "rec"])}
    assert results[files[2].name].state == "tampered"
    assert "missing" in (results[files[2].name].reason or "")


@pytest.mark.asyncio
async def test_an_altered_sidecar_body_is_caught(tmp_path: Path) -> None:
    rec = recorder(tmp_path, max_inline_body=1024)
    await rec.open()
    await rec.append("response", request_id="r1", status=200, body=b"A" * 5000)
    await rec.close()
    [blob] = (tmp_path / "rec" / "blobs").iterdir()
    blob.write_bytes(b"B" * 5000)
    [result] = verify([tmp_path / "rec"])
    assert result.state == "tampered" and result.first_bad_seq == 2
    assert "sidecar" in (result.reason or "")
