"""`lfm2 list`: a cache index read defensively (a damaged entry is one note, the rest still works, nothing on disk
changes), and `lfm2 list --available` (what can run here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lfm2cli.hub import local
from lfm2cli.hub.known import known_config
from lfm2cli.loading.fit import memory_needed
from lfm2cli.terminal.formatting import human_bytes
from tests.helpers import run_main

GOOD, BAD = "test-org/good", "test-org/bad"
COMMIT = "c" * 40


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Our cache and an empty Hugging Face cache of the test's own; no network."""
    monkeypatch.setenv("LFM2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


def cached(cache: Path, repo: str, src: Path, commit: str = COMMIT, complete: bool = True) -> Path:
    """`src` as `pull` leaves it in our cache: the snapshot, the ref main and (when complete) the index."""
    snap = Path(shutil.copytree(src, local.snapshot_dir(repo, commit, cache)))
    if complete:
        local.mark_complete(repo, commit, {p.name: p.stat().st_size for p in snap.iterdir()}, cache)
    local.write_ref(repo, "main", commit, cache)
    return snap


def tree(root: Path) -> dict[str, object]:
    """Every entry under root, links as their targets (never followed), files by content (a big one by size and
    time): what "nothing changed" compares."""
    out: dict[str, object] = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(top) / name
            st = path.lstat()
            if path.is_symlink():
                out[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif path.is_file():
                small = st.st_size < 1 << 20
                out[str(path.relative_to(root))] = path.read_bytes() if small else (st.st_size, st.st_mtime_ns)
            else:
                out[str(path.relative_to(root))] = "folder"
    return out


def lines(text: str) -> list[str]:
    return text.splitlines()


# ---- a damaged index: one note, the snapshot listed as incomplete, the rest still works ----

DAMAGED = {
    "files null": ('{"files": null}', "'files' is null, not an object of file names and sizes"),
    "files a list": ('{"files": ["config.json"]}', "'files' is a list, not an object of file names and sizes"),
    "files empty": ('{"files": {}}', "'files' is empty"),
    "no weights": ('{"files": {"config.json": 2}}', "'files' lacks config.json or the weights"),
    "a path out": ('{"files": {"config.json": 2, "../../../../etc/passwd": 1}}',
                   "'files' names '../../../../etc/passwd', which is not a file of the snapshot"),
    "size a string": ('{"files": {"config.json": "2", "model.safetensors": 1}}',
                      "'files' gives config.json the size '2', not a number of bytes"),
    "not an object": ("[1, 2]", "a list, not the JSON object lfm2 writes"),
    "not JSON": ('{"files": ', "not valid JSON"),
    "nested too deep": ("[" * 100_000, "not valid JSON"),
}


@pytest.mark.parametrize("kind", list(DAMAGED))
def test_a_damaged_index_is_one_note_and_the_rest_works(kind, cache, dense_ckpt, monkeypatch, capsys):
    content, why = DAMAGED[kind]
    cached(cache, GOOD, dense_ckpt)
    cached(cache, BAD, dense_ckpt)
    meta = cache / "models" / "test-org--bad" / "meta" / f"{COMMIT}.json"
    meta.write_text(content)
    (cache / "models" / "test-org--good" / "last_used").touch()  # so that resolving GOOD changes nothing either
    before = tree(cache)

    code, out, err = run_main(["list"], monkeypatch, capsys)
    assert code == 0
    assert lines(err) == [f"note: {meta}: {why}; the snapshot is listed as incomplete (`lfm2 pull {BAD}` "
                          "repairs it)"]
    rows = [line.split("\t") for line in lines(out)]
    assert [(r[0], r[1]) for r in rows] == [(BAD, "main (incomplete)"), (GOOD, "main")]

    code, out, err = run_main(["info", BAD], monkeypatch, capsys)
    assert code == 1 and out == ""
    assert lines(err) == [f"error: {meta}: {why}; {BAD} cannot be used from the cache until `lfm2 pull {BAD}` "
                          "repairs it"]
    code, out, err = run_main(["info", GOOD], monkeypatch, capsys)
    assert code == 0 and "architecture: LFM2" in out
    assert tree(cache) == before


def test_files_deleted_by_hand_make_a_snapshot_incomplete_without_a_note(cache, dense_ckpt, monkeypatch, capsys):
    snap = cached(cache, GOOD, dense_ckpt)
    (snap / "model.safetensors").unlink()
    code, out, err = run_main(["list"], monkeypatch, capsys)
    assert code == 0 and err == "" and "(incomplete)" in out
    assert local.find_cached(GOOD) is None


# ---- links out of the cache are never followed, listed, written through or deleted through ----

@pytest.fixture()
def outside(tmp_path: Path) -> Path:
    """A folder outside the cache that looks huge: followed, a listing would count a terabyte."""
    target = tmp_path / "outside"
    target.mkdir()
    with (target / "model.safetensors").open("wb") as f:
        f.truncate(1 << 40)  # sparse: no disk used
    (target / "config.json").write_text('{"model_type": "lfm2"}')
    return target


@pytest.mark.parametrize("level", ["snapshot", "model"])
def test_a_link_out_of_the_cache_is_skipped_with_a_note(level, cache, dense_ckpt, outside, monkeypatch, capsys):
    cached(cache, GOOD, dense_ckpt)
    root = local.model_dir("test-org/linked", cache)
    if level == "snapshot":
        link = local.snapshot_dir("test-org/linked", COMMIT, cache)
        link.parent.mkdir(parents=True)
        local.write_ref("test-org/linked", "main", COMMIT, cache)
        local.mark_complete("test-org/linked", COMMIT, {"config.json": 22, "model.safetensors": 1 << 40}, cache)
    else:
        link = root
        link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    before, outside_before = tree(cache), tree(outside)

    code, out, err = run_main(["list"], monkeypatch, capsys)
    assert code == 0
    assert lines(err) == [f"note: {link} is a link to {outside}, which lfm2 does not follow; skipped "
                          "(`lfm2 rm test-org/linked` removes the link, not what it points at)"]
    assert [line.split("\t")[0] for line in lines(out)] == [GOOD]

    code, out, err = run_main(["info", "test-org/linked"], monkeypatch, capsys)
    assert code == 1 and out == ""
    if level == "snapshot":
        assert lines(err) == [f"error: {link} is a link to {outside}, which lfm2 does not follow; test-org/linked "
                              "cannot be used from the cache until `lfm2 pull test-org/linked` repairs it"]
    else:  # nothing of the model is read through the link: it is simply not downloaded
        assert lines(err) == ["error: test-org/linked is not downloaded and offline mode is on; run "
                              "`lfm2 pull test-org/linked` while online"]
    assert tree(cache) == before and tree(outside) == outside_before

    code, _, err = run_main(["rm", "test-org/linked", "--yes"], monkeypatch, capsys)
    assert code == 0, err
    assert not link.is_symlink() and tree(outside) == outside_before  # the link went, what it pointed at stayed
    assert local.find_cached(GOOD) is not None


def test_pull_never_writes_through_a_link(cache, dense_ckpt, outside, monkeypatch, capsys):
    from tests.hub_server import FakeHub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    with FakeHub() as hub:
        commit = hub.add_repo("test-org/linked", {"tokenizer.json": b"{}"}, source=dense_ckpt)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        link = local.snapshot_dir("test-org/linked", commit, cache)
        link.parent.mkdir(parents=True)
        link.symlink_to(outside, target_is_directory=True)
        outside_before = tree(outside)
        code, out, err = run_main(["pull", "test-org/linked"], monkeypatch, capsys)
        assert code == 1 and out == ""
        assert lines(err) == [
            f"error: {link} is a link to {outside}, and lfm2 writes no files through links in its cache; remove "
            "the link (`lfm2 rm test-org/linked` does, and leaves what it points at), then pull again"]
        assert tree(outside) == outside_before and hub.downloads() == []


def test_a_listing_reads_a_bounded_number_of_entries(cache, dense_ckpt, monkeypatch, capsys):
    snap = cached(cache, GOOD, dense_ckpt)
    for i in range(30):
        (snap / f"junk-{i:02}").write_bytes(b"x")
    monkeypatch.setattr(local, "MAX_ENTRIES", 20)
    before = tree(cache)
    code, out, err = run_main(["list"], monkeypatch, capsys)
    assert code == 0 and lines(out)[0].startswith(f"{GOOD}\tmain\t")
    assert lines(err) == [f"note: {snap}: more than 20 entries, not a snapshot lfm2 wrote; its size is counted up "
                          "to there"]
    assert tree(cache) == before


def test_leftovers_of_an_interrupted_rm_are_shown(cache, dense_ckpt, monkeypatch, capsys):
    """Shown, not cleaned: `list` changes nothing on disk, and the note says how to delete them."""
    cached(cache, GOOD, dense_ckpt)
    trash = cache / "models" / ".deleting-4242-1700000000000000000"
    (trash / "snapshots" / COMMIT).mkdir(parents=True)
    (trash / "snapshots" / COMMIT / "model.safetensors").write_bytes(b"x" * 1500)
    before = tree(cache)
    code, out, err = run_main(["list"], monkeypatch, capsys)
    assert code == 0 and [line.split("\t")[0] for line in lines(out)] == [GOOD]
    assert lines(err) == [f"note: {trash} is left over from an interrupted `lfm2 rm` (1.50 kB); delete it with: "
                          f"rm -rf {trash}"]
    assert tree(cache) == before


@pytest.mark.slow
def test_list_of_a_hostile_cache_is_bounded_in_memory(cache, dense_ckpt, outside, tmp_path):
    """The real command in a fresh process under a 1 GiB address-space limit, on a cache with every kind of
    damage at once: it lists the good model, one note per bad entry, exit 0."""
    cached(cache, GOOD, dense_ckpt)
    cached(cache, BAD, dense_ckpt)
    (cache / "models" / "test-org--bad" / "meta" / f"{COMMIT}.json").write_text("[" * 1_000_000)
    (cache / "models" / "test-org--linked").symlink_to(outside, target_is_directory=True)
    (cache / "models" / ".deleting-1-2").mkdir()
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
    r = subprocess.run([sys.executable, "-c", limit + "from lfm2cli.cli import main; main()", "list"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "LFM2_CACHE": str(cache), "HF_HUB_CACHE": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr
    assert [line.split("\t")[:2] for line in lines(r.stdout)] == [[BAD, "main (incomplete)"], [GOOD, "main"]]
    notes = lines(r.stderr)
    assert len(notes) == 3 and all(n.startswith("note: ") for n in notes)


# ---- lfm2 list --available ----

def _available_rows(out: str) -> dict[str, list[str]]:
    rows = [line.split("\t") for line in lines(out)]
    assert all(len(r) == 8 for r in rows), rows
    return {r[0]: r[1:] for r in rows}


def test_available_lists_the_known_models_with_sizes_fit_and_download_state(cache, chat_ckpt, tmp_path,
                                                                           monkeypatch, capsys):
    import lfm2cli.system.memory

    cached(cache, "LiquidAI/LFM2-350M", chat_ckpt)
    cached(cache, "LiquidAI/LFM2-700M", chat_ckpt, complete=False)  # an interrupted pull
    hf = tmp_path / "hf" / "models--LiquidAI--LFM2-1.2B"  # the Hugging Face cache's layout, links into blobs/
    (hf / "refs").mkdir(parents=True)
    (hf / "refs" / "main").write_text(COMMIT)
    (hf / "snapshots" / COMMIT).mkdir(parents=True)
    for f in chat_ckpt.iterdir():
        (hf / "blobs").mkdir(exist_ok=True)
        shutil.copy(f, hf / "blobs" / f.name)
        (hf / "snapshots" / COMMIT / f.name).symlink_to(Path("../../blobs") / f.name)
    cfg_8b = known_config("lfm2-8b-a1b")
    free = memory_needed(cfg_8b, "int8")  # the 8B fits in int8 exactly, not in bf16
    monkeypatch.setattr(lfm2cli.system.memory, "system_available_memory", lambda: free)

    code, out, err = run_main(["list", "--available"], monkeypatch, capsys)
    assert code == 0
    assert lines(err) == [f"{human_bytes(free)} of memory available now; sizes are what running takes (weights, a "
                          "4,096-token KV cache and the runtime)"]
    rows = _available_rows(out)
    assert list(rows)[:6] == ["lfm2-350m", "lfm2-700m", "lfm2-1.2b", "lfm2-2.6b", "lfm2-8b-a1b", "lfm2-24b-a2b"]
    assert {"lfm2.5-1.2b-instruct", "lfm2.5-8b-a1b", "lfm2.5-230m"} <= set(rows)
    for alias, (repo, params, bf16, int8, int4, fits, _) in rows.items():
        cfg = known_config(alias)
        assert repo == f"LiquidAI/{repo.split('/')[1]}" and repo.lower() == f"liquidai/{alias}"
        assert [int(bf16), int(int8), int(int4)] == [memory_needed(cfg, q) for q in (None, "int8", "int4")]
        assert int(bf16) > int(int8) > int(int4) and int(params) > 200_000_000
        assert fits == next((p for p, n in (("bf16", bf16), ("int8", int8), ("int4", int4)) if int(n) <= free), "no")
    assert rows["lfm2-350m"][5:] == ["bf16", "yes"]
    assert rows["lfm2-700m"][6] == "partial"
    assert rows["lfm2-1.2b"][6] == "hf-cache"
    assert rows["lfm2-8b-a1b"][5:] == ["int8", "no"]
    assert rows["lfm2-24b-a2b"][5] == "no"  # even int4 needs more than the 8B in int8


@pytest.mark.slow
def test_available_on_this_machine_imports_no_torch(cache):
    """The real command, unpatched: this machine's memory, and no torch import (it answers at once)."""
    code = ("import sys\nfrom lfm2cli.cli import main\nsys.argv = ['lfm2', 'list', '--available']\ntry:\n    main()\n"
            "except SystemExit as e:\n    assert not e.code, e.code\nassert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = _available_rows(r.stdout)
    assert len(rows) >= 18 and {row[5] for row in rows.values()} <= {"bf16", "int8", "int4", "no"}
    assert lines(r.stderr)[0].endswith(" of memory available now; sizes are what running takes (weights, a "
                                       "4,096-token KV cache and the runtime)")


@pytest.mark.slow
@pytest.mark.parametrize("args", [["list"], ["list", "--available"]])
def test_tables_on_a_terminal(args, cache, dense_ckpt, tmp_path):
    """On a terminal both listings are tables with a header; the source column marks where a model lives."""
    import pty

    cached(cache, GOOD, dense_ckpt)
    leader, follower = pty.openpty()
    env = {**os.environ, "LFM2_CACHE": str(cache), "HF_HUB_CACHE": str(tmp_path / "hf"), "COLUMNS": "160"}
    with subprocess.Popen([sys.executable, "-m", "lfm2cli", *args], stdout=follower, stderr=subprocess.PIPE,
                          env=env) as proc:
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=60)
    os.close(leader)
    text = b"".join(chunks).decode()
    assert proc.returncode == 0
    if args == ["list"]:
        assert "SOURCE" in text and "LAST USED" in text and GOOD in text and "lfm2" in text
    else:
        assert "FITS NOW" in text and "DOWNLOADED" in text and "lfm2-8b-a1b" in text and "INT4" in text
    assert "\t" not in text


def test_variants_share_their_model_sizes_and_nothing_fits_in_no_memory() -> None:
    from lfm2cli.hub.catalog import catalog

    entries = {e.alias: e for e in catalog(0)}
    assert entries["lfm2.5-1.2b-thinking"].needs == entries["lfm2.5-1.2b-instruct"].needs
    assert entries["lfm2.5-8b-a1b-base"].needs == entries["lfm2.5-8b-a1b"].needs
    assert all(e.fits is None for e in entries.values())
