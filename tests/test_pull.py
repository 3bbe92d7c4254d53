"""`lfm2 pull`, model resolution, `list` and `rm`, against a fake hub on 127.0.0.1 (tests/hub_server.py)."""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lfm2cli.cli import app
from lfm2cli.commands.confirm import ask_yes_no
from lfm2cli.errors import CheckpointError, HubError, UsageError
from lfm2cli.hub import download, local, names
from lfm2cli.hub.progress import LineProgress, RichProgress
from tests.helpers import run_main
from tests.hub_server import FakeHub

REPO = "test-org/tiny-lfm2"
EXTRA = {"tokenizer.json": b'{"version": "1.0"}', "tokenizer_config.json": b"{}",
         "README.md": b"# not needed", "onnx/model.onnx": b"not needed either"}


@pytest.fixture()
def fake_hub(dense_ckpt: Path) -> FakeHub:
    with FakeHub() as server:
        server.add_repo(REPO, EXTRA, source=dense_ckpt)
        yield server


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_hub: FakeHub) -> dict[str, str]:
    """Our cache and the Hugging Face home in tmp, the hub at the fake server, no token, no waiting."""
    import huggingface_hub.constants

    values = {"LFM2_CACHE": str(tmp_path / "lfm2-cache"), "HF_HOME": str(tmp_path / "hf-home"),
              "HF_ENDPOINT": fake_hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
              "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(k, raising=False)
    # huggingface_hub fixed its token file path and offline mode at import; keep a real login out of these
    # tests, and let them reach the fake hub when the user runs the suite with HF_HUB_OFFLINE=1 exported
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(download, "RETRY_DELAY", 0.0)
    return values


def quiet() -> LineProgress:
    return LineProgress(io.StringIO())


def run_cli(args: list[str], env_vars: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real entry point in a fresh process, so the error boundary and import-time settings are real."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(env_vars)
    return subprocess.run([sys.executable, "-m", "lfm2cli", *args], capture_output=True, text=True, env=env,
                          timeout=60, cwd=cwd)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its content: what "nothing was changed" compares."""
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


# ---- pull ----

def test_full_pull_downloads_only_needed_files_and_verifies(env, fake_hub, dense_ckpt):
    result = download.pull_model(REPO, progress=quiet())
    assert result.source == "downloaded"
    files = sorted(p.name for p in result.path.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    assert (result.path / "model.safetensors").read_bytes() == (dense_ckpt / "model.safetensors").read_bytes()
    assert result.path == local.find_cached(REPO)
    assert result.path.is_relative_to(Path(env["LFM2_CACHE"]))
    assert not any(r.path.endswith(("README.md", "model.onnx")) for r in fake_hub.log)


def test_pull_cut_mid_file_resumes_with_range_in_the_same_run(env, fake_hub, dense_ckpt):
    size = (dense_ckpt / "model.safetensors").stat().st_size
    fake_hub.cut["model.safetensors"] = 10_000
    path = download.pull_model(REPO, progress=quiet()).path
    gets = fake_hub.requests("GET", file="model.safetensors")
    assert [g.headers.get("range") for g in gets if g.path.startswith("/cdn/")] == [None, "bytes=10000-"]
    assert fake_hub.file_bytes["model.safetensors"] == size  # nothing was sent twice
    assert (path / "model.safetensors").read_bytes() == (dense_ckpt / "model.safetensors").read_bytes()


def test_pull_interrupted_then_resumed_by_the_next_pull(env, fake_hub, dense_ckpt):
    fake_hub.cut["model.safetensors"] = 123_456
    fake_hub.after_cut = 503  # the first run cannot continue: it must fail and leave its partial file
    with pytest.raises(HubError, match="run the same command again to resume"):
        download.pull_model(REPO, progress=quiet())
    commit = fake_hub.repos[REPO].refs["main"]
    partial = local.snapshot_dir(REPO, commit) / "model.safetensors.incomplete"
    assert partial.stat().st_size == 123_456
    assert local.find_cached(REPO) is None  # an incomplete model is never used

    fake_hub.fail.clear()
    fake_hub.reset_log()
    path = download.pull_model(REPO, progress=quiet()).path
    content = [g for g in fake_hub.requests("GET", file="model.safetensors") if g.path.startswith("/cdn/")]
    assert [g.headers.get("range") for g in content] == ["bytes=123456-"]
    assert (path / "model.safetensors").read_bytes() == (dense_ckpt / "model.safetensors").read_bytes()
    assert not partial.exists()


def test_second_pull_transfers_nothing(env, fake_hub):
    download.pull_model(REPO, progress=quiet())
    fake_hub.reset_log()
    result = download.pull_model(REPO, progress=quiet())
    assert result.source == "up to date" and result.downloaded == 0
    assert fake_hub.downloads() == [] and sum(fake_hub.file_bytes.values()) == 0
    assert all(r.path.startswith("/api/") for r in fake_hub.log)


def test_pull_of_a_moved_branch_fetches_the_new_commit_and_drops_the_old(env, fake_hub, dense_ckpt):
    old = download.pull_model(REPO, progress=quiet()).path
    new_commit = fake_hub.add_repo(REPO, {**EXTRA, "tokenizer.json": b'{"version": "2.0"}'}, source=dense_ckpt)
    new = download.pull_model(REPO, progress=quiet()).path
    assert new.name == new_commit and not old.exists()
    assert local.find_cached(REPO) == new


def test_pull_revision_is_resolved_by_that_revision_only(env, fake_hub, dense_ckpt):
    tag_commit = fake_hub.add_repo(REPO, {**EXTRA, "tokenizer.json": b"{}"}, source=dense_ckpt, branch="v1")
    path = download.pull_model(REPO, revision="v1", progress=quiet()).path
    assert path.name == tag_commit
    assert names.resolve_model(REPO, revision="v1") == path
    assert names.resolve_model(REPO, revision=tag_commit) == path
    with pytest.raises(HubError, match="not downloaded"):
        names.resolve_model(REPO)  # main was never pulled


def test_not_an_lfm2_checkpoint_is_refused_before_the_weights(env, fake_hub):
    config = json.dumps({"model_type": "llama", "hidden_size": 8}).encode()
    fake_hub.add_repo("test-org/llama", {"config.json": config, "model.safetensors": b"x" * 1000})
    with pytest.raises(HubError, match=r"not an LFM2 checkpoint \(model_type 'llama'\).*lfm2_moe"):
        download.pull_model("test-org/llama", progress=quiet())
    assert fake_hub.requests("GET", file="model.safetensors") == []


def test_checkpoint_missing_tensors_is_not_reported_as_success(env, fake_hub, dense_ckpt):
    config = json.loads((dense_ckpt / "config.json").read_text())
    config["num_hidden_layers"] += 1
    config["layer_types"] = [*config["layer_types"], "conv"]
    files = {"config.json": json.dumps(config).encode(), "tokenizer.json": b"{}",
             "model.safetensors": (dense_ckpt / "model.safetensors").read_bytes()}
    fake_hub.add_repo("test-org/broken", files)
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.4\."):
        download.pull_model("test-org/broken", progress=quiet())
    assert local.find_cached("test-org/broken") is None


def test_repo_without_safetensors_says_so(env, fake_hub):
    fake_hub.add_repo("test-org/gguf", {"config.json": b'{"model_type": "lfm2"}', "model.gguf": b"x"})
    with pytest.raises(HubError, match="no safetensors weights"):
        download.pull_model("test-org/gguf", progress=quiet())


def test_gated_repo_needs_a_token(env, fake_hub, dense_ckpt, monkeypatch):
    fake_hub.add_repo("test-org/gated", EXTRA, source=dense_ckpt, gated=True)
    fake_hub.token = "hf_secret"
    with pytest.raises(HubError, match=r"is gated: accept its terms at .*(HF_TOKEN|hf auth login)"):
        download.pull_model("test-org/gated", progress=quiet())
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert download.pull_model("test-org/gated", progress=quiet()).source == "downloaded"
    assert fake_hub.requests("GET", file="config.json")[-1].headers["authorization"] == "Bearer hf_secret"


def test_disk_full_is_one_clear_line():
    with pytest.raises(HubError, match="disk full while downloading x/y; free some space"):
        with download._explained("x/y", None):
            raise OSError(errno.ENOSPC, "No space left on device")


def test_rich_progress_bar_renders_the_whole_download(env, fake_hub):
    from rich.console import Console

    out = io.StringIO()
    progress = RichProgress(Console(file=out, force_terminal=True, width=120))
    download.pull_model(REPO, progress=progress)
    assert REPO in out.getvalue() and "566.3" in out.getvalue()  # total bytes of the served files


def test_plain_progress_lines(env, fake_hub):
    progress = quiet()
    download.pull_model(REPO, progress=progress)
    text = progress.stream.getvalue()
    assert text.startswith(f"pulling {REPO}: 566 kB to download\n")
    assert "  model.safetensors (565 kB)\n" in text and "100% (566 kB of 566 kB)" in text


# ---- errors through the real CLI (one line, exit code 1, no traceback) ----

def test_cli_repo_not_found(env):
    r = run_cli(["pull", "test-org/nope"], env)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: test-org/nope was not found on {env['HF_ENDPOINT']}; check the name (a private repository "
        "needs HF_TOKEN or `hf auth login`)"]
    assert r.stdout == ""


def test_cli_revision_not_found(env):
    r = run_cli(["pull", REPO, "--revision", "v9"], env)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {REPO} has no revision 'v9'; pass an existing branch, tag or commit to --revision"]


def test_cli_no_network(env):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_cli(["pull", REPO], {**env, "HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach http://127.0.0.1:{port}")
    assert "--offline" not in lines[0]  # pull has no such option (and nothing is downloaded to run offline)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_pull_of_a_complete_model_without_the_hub_says_so(env, fake_hub):
    """Offline or with no network, a model complete in the cache is a success: its path, one line saying the hub
    was not asked, exit 0, and nothing in the cache changed."""
    path = download.pull_model(REPO, progress=quiet()).path
    before = tree(Path(env["LFM2_CACHE"]))
    commit = path.name
    for extra, why in (({"HF_HUB_OFFLINE": "1"}, "offline mode is on (HF_HUB_OFFLINE=1)"),
                       ({"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}, "cannot reach http://127.0.0.1:")):
        r = run_cli(["pull", REPO], {**env, **extra})
        assert r.returncode == 0, r.stderr
        assert Path(r.stdout.strip()) == path
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"{REPO} (main = {commit[:12]}, 566 kB) is already downloaded; not checked for a newer commit: {why}")
    assert tree(Path(env["LFM2_CACHE"])) == before
    # a revision that was never pulled is still an error, and says what to do
    r = run_cli(["pull", REPO, "--revision", "v2"], {**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "error: offline mode is on (HF_HUB_OFFLINE=1); unset it to download models"]


def test_pull_of_a_model_in_the_hf_cache_without_the_hub(env, fake_hub, monkeypatch):
    from huggingface_hub import snapshot_download

    hf_path = Path(snapshot_download(REPO, cache_dir=Path(env["HF_HOME"]) / "hub", endpoint=fake_hub.url))
    fake_hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = download.pull_model(REPO, progress=quiet())
    assert result.path == hf_path and result.source == "hf cache" and result.downloaded == 0
    assert result.unchecked_because == "offline mode is on (HF_HUB_OFFLINE=1)"
    assert not local.model_dir(REPO).exists()


def test_cli_pull_prints_the_path(env, fake_hub):
    r = run_cli(["pull", REPO], env)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    assert path == local.find_cached(REPO) and (path / "model.safetensors").is_file()
    assert f"{REPO} (main = " in r.stderr and "is ready" in r.stderr


# ---- resolution ----

def test_resolve_uses_the_cache_without_any_request(env, fake_hub):
    path = download.pull_model(REPO, progress=quiet()).path
    fake_hub.reset_log()
    assert names.resolve_model(REPO) == path
    assert names.resolve_model(REPO, pull=True) == path
    assert fake_hub.log == []


def test_offline_resolution_works_with_no_server(env, fake_hub):
    path = download.pull_model(REPO, progress=quiet()).path
    fake_hub.stop()
    assert names.resolve_model(REPO) == path
    assert names.resolve_model(REPO, offline=True) == path
    r = run_cli(["list"], {**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and r.stdout.startswith(f"{REPO}\tmain\t")


def test_offline_missing_model_never_touches_the_network(env, fake_hub, monkeypatch):
    with pytest.raises(HubError, match="not downloaded and offline mode is on; run `lfm2 pull test-org/other`"):
        names.resolve_model("test-org/other", offline=True, pull=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="offline mode is on"):
        names.resolve_model(REPO, pull=True)
    with pytest.raises(HubError, match="offline mode is on"):
        download.pull_model(REPO)
    assert fake_hub.log == []


def test_missing_model_without_pull_says_how_to_get_it(env, fake_hub):
    with pytest.raises(HubError, match=rf"{REPO} is not downloaded yet; run: lfm2 pull {REPO} \(or pass --pull\)"):
        names.resolve_model(REPO)
    assert fake_hub.log == []
    path = names.resolve_model(REPO, pull=True, progress=quiet())
    assert path == local.find_cached(REPO)


def test_interactive_resolution_asks_first(env, fake_hub, monkeypatch, capsys):
    def ask(question: str) -> bool:
        return ask_yes_no(question, default=True)

    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    with pytest.raises(HubError, match="was not downloaded"):
        names.resolve_model(REPO, confirm=ask, progress=quiet())
    assert f"Download {REPO} (566 kB)? [Y/n]" in capsys.readouterr().err
    assert fake_hub.downloads() == []
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))  # Enter means yes
    assert names.resolve_model(REPO, confirm=ask, progress=quiet()) == local.find_cached(REPO)


def test_model_in_the_standard_hf_cache_is_reused(env, fake_hub):
    from huggingface_hub import snapshot_download

    hf_cache = Path(env["HF_HOME"]) / "hub"
    hf_path = Path(snapshot_download(REPO, cache_dir=hf_cache, endpoint=fake_hub.url))
    fake_hub.reset_log()
    assert names.resolve_model(REPO) == hf_path
    assert fake_hub.log == []
    result = download.pull_model(REPO, progress=quiet())  # pull asks which commit main is, then downloads nothing
    assert result.source == "hf cache" and result.path == hf_path
    assert fake_hub.downloads() == []
    assert not local.model_dir(REPO).exists()


def test_names_aliases_and_directories(dense_ckpt, tmp_path):
    assert names.repo_id_for(None) == "LiquidAI/LFM2-350M"
    assert names.repo_id_for("lfm2-1.2b") == "LiquidAI/LFM2-1.2B"
    assert names.repo_id_for("LFM2-8B-A1B") == "LiquidAI/LFM2-8B-A1B"
    assert names.repo_id_for("lfm2.5-1.2b-instruct") == "LiquidAI/LFM2.5-1.2B-Instruct"
    assert names.repo_id_for("liquidai/lfm2-700m") == "LiquidAI/LFM2-700M"
    assert names.repo_id_for("someone/their-model") == "someone/their-model"
    with pytest.raises(UsageError, match="not a local directory, a hub repo id"):
        names.repo_id_for("no spaces allowed")
    assert names.resolve_model(str(dense_ckpt)) == dense_ckpt
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        names.resolve_model(str(tmp_path / "missing"))


# ---- list and rm ----

def test_list_shows_models_and_last_use(env, fake_hub):
    runner = CliRunner()
    empty = runner.invoke(app, ["list"])
    assert empty.exit_code == 0 and empty.stdout == ""
    path = download.pull_model(REPO, progress=quiet()).path
    size = sum(f.stat().st_size for f in path.iterdir())
    lines = runner.invoke(app, ["list"]).stdout.splitlines()
    assert lines == [f"{REPO}\tmain\t{size}\tLFM2\tnever\tlfm2"]
    names.resolve_model(REPO)
    fields = runner.invoke(app, ["list"]).stdout.strip().split("\t")
    assert fields[:4] == [REPO, "main", str(size), "LFM2"] and fields[4][:2] == "20"  # an ISO date
    assert fields[5] == "lfm2"


def test_list_shows_models_in_the_hf_cache(env, fake_hub, monkeypatch, capsys):
    """`generate` runs a model from the Hugging Face cache, so `list` shows it, marked as such."""
    from huggingface_hub import snapshot_download

    hf_path = Path(snapshot_download(REPO, cache_dir=Path(env["HF_HOME"]) / "hub", endpoint=fake_hub.url))
    size = sum(f.stat().st_size for f in hf_path.rglob("*") if f.is_file())  # links followed into blobs/
    capsys.readouterr()
    code, out, err = run_main(["list"], monkeypatch, capsys)
    assert code == 0 and err == ""
    assert out.splitlines() == [f"{REPO}\tmain\t{size}\tLFM2\t-\thf-cache"]
    assert names.resolve_model(REPO) == hf_path  # what `generate` runs is what `list` shows
    download.pull_model(REPO, progress=quiet())  # commit already there: nothing is downloaded
    code, out, _ = run_main(["list"], monkeypatch, capsys)
    assert [line.split("\t")[-1] for line in out.splitlines()] == ["hf-cache"]
    # a model of another architecture in the same cache is none of lfm2's business
    other = Path(env["HF_HOME"]) / "hub" / "models--test-org--llama" / "snapshots" / ("b" * 40)
    other.mkdir(parents=True)
    (other / "config.json").write_text('{"model_type": "llama"}')
    code, out, err = run_main(["list"], monkeypatch, capsys)
    assert code == 0 and len(out.splitlines()) == 1 and err == ""


def test_list_shows_an_interrupted_download(env, fake_hub):
    fake_hub.cut["model.safetensors"] = 1000
    fake_hub.after_cut = 503
    with pytest.raises(HubError):
        download.pull_model(REPO, progress=quiet())
    out = CliRunner().invoke(app, ["list"]).stdout
    assert out.startswith(f"{REPO}\t") and "(incomplete)" in out


def test_rm_asks_for_yes_when_not_interactive(env, fake_hub):
    download.pull_model(REPO, progress=quiet())
    runner = CliRunner()
    refused = runner.invoke(app, ["rm", REPO])
    assert isinstance(refused.exception, UsageError) and "--yes" in str(refused.exception)
    assert local.find_cached(REPO) is not None
    done = runner.invoke(app, ["rm", REPO, "--yes"])
    assert done.exit_code == 0, done.output
    assert not local.model_dir(REPO).exists()
    assert runner.invoke(app, ["list"]).stdout == ""
    missing = runner.invoke(app, ["rm", REPO, "--yes"])
    assert isinstance(missing.exception, HubError) and "not in the lfm2 cache" in str(missing.exception)


def test_cache_dir_option_overrides_the_environment(env, fake_hub, tmp_path):
    other = tmp_path / "elsewhere"
    runner = CliRunner()
    r = runner.invoke(app, ["pull", REPO, "--cache-dir", str(other)])
    assert r.exit_code == 0, r.output
    assert Path(r.stdout.strip()).is_relative_to(other)
    assert not Path(env["LFM2_CACHE"]).exists()
    assert runner.invoke(app, ["list", "--cache-dir", str(other)]).stdout.startswith(f"{REPO}\tmain\t")


def test_yes_no_question():
    out = io.StringIO()
    assert ask_yes_no("Go?", True, io.StringIO("\n"), out) is True
    assert out.getvalue() == "Go? [Y/n] "
    assert ask_yes_no("Go?", False, io.StringIO("\n"), io.StringIO()) is False
    assert ask_yes_no("Go?", False, io.StringIO("YES\n"), io.StringIO()) is True
    assert ask_yes_no("Go?", True, io.StringIO(""), io.StringIO()) is False  # end of input


# ---- names that are paths, a cache that is a file, a cache that cannot be changed ----

@pytest.mark.slow
def test_cli_a_mistyped_path_is_not_sent_to_the_hub(env, fake_hub, tmp_path):
    # the rule (hub/names.py): `owner/name` is a path when the folder `owner` is here and no cache holds it;
    # a leading `.`, `/` or `~`, a backslash, a second `/` or a trailing `/` always make a path
    (tmp_path / "some").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"not a directory")
    cases = {
        "some/typo": "error: some/typo: no such checkpoint directory (some/ has no typo); check the path, or run "
                     "`lfm2 pull some/typo` if you meant the hub repo",
        "some/typo/": "error: some/typo/: no such checkpoint directory (some/ has no typo); check the path",
        "./some/deeper/typo": "error: ./some/deeper/typo: no such checkpoint directory; check the path",
        "weights.safetensors": "error: weights.safetensors is a file, not a checkpoint directory; pass the folder "
                               "that holds config.json and the .safetensors files",
    }
    before = tree(tmp_path)
    for name, line in cases.items():
        r = run_cli(["info", name], env, cwd=tmp_path)
        assert r.returncode == 1, (name, r.stderr)
        assert r.stderr.splitlines() == [line] and r.stdout == ""
    assert tree(tmp_path) == before and not Path(env["LFM2_CACHE"]).exists()
    assert fake_hub.log == []
    # without the local folder the same shape is a hub id, and the message says how to pull it (info has no --pull)
    r = run_cli(["info", "other/typo"], env, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "error: other/typo is not downloaded yet; run: lfm2 pull other/typo"]


def test_a_downloaded_model_resolves_even_where_its_owner_is_a_folder(env, fake_hub, tmp_path, monkeypatch):
    path = download.pull_model(REPO, progress=quiet()).path
    (tmp_path / REPO.split("/")[0]).mkdir()
    monkeypatch.chdir(tmp_path)
    assert names.resolve_model(REPO) == path
    with pytest.raises(CheckpointError, match="test-org/other: no such checkpoint directory"):
        names.resolve_model("test-org/other")


@pytest.mark.slow
@pytest.mark.parametrize("inside", [False, True], ids=["the-file", "below-the-file"])
def test_cli_cache_setting_that_is_a_file_is_one_line(env, fake_hub, tmp_path, inside):
    blocker = tmp_path / "cache-file"
    blocker.write_text("my notes\n")
    setting = blocker / "sub" if inside else blocker
    what = f"is inside {blocker}, which is a file" if inside else "is a file, not a directory"
    for args in (["list"], ["rm", REPO, "--yes"], ["pull", REPO], ["info", REPO]):
        r = run_cli(args, {**env, "LFM2_CACHE": str(setting)})
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.splitlines() == [
            f"error: LFM2_CACHE={setting} {what}; point LFM2_CACHE at a directory, or unset it"], args
        assert r.stdout == ""
    r = run_cli(["list", "--cache-dir", str(setting)], env)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        f"error: --cache-dir {setting} {what}; pass a directory to --cache-dir"]
    assert blocker.read_text() == "my notes\n"
    assert fake_hub.downloads() == []


def _pulled(env: dict[str, str]) -> tuple[Path, dict[str, bytes]]:
    download.pull_model(REPO, progress=quiet())
    root = local.model_dir(REPO)
    return root, tree(root)


def test_cli_rm_on_a_read_only_cache_deletes_nothing(env, fake_hub):
    root, before = _pulled(env)
    snapshots = root / "snapshots"
    snapshots.chmod(0o555)  # rmtree would delete refs/ and meta/, then stop here: half a model
    try:
        if os.access(snapshots, os.W_OK):
            pytest.skip("running as root: chmod does not stop deletion (the patched test covers this path)")
        r = run_cli(["rm", REPO, "--yes"], env)
    finally:
        snapshots.chmod(0o755)
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [
        f"error: cannot delete {REPO}: {snapshots} is not writable by this user; nothing was deleted; make it "
        f"writable (chmod -R u+w {root}) or run lfm2 rm as its owner"]
    assert tree(root) == before and local.find_cached(REPO) is not None


def test_cli_rm_checks_every_folder_before_deleting(env, fake_hub, monkeypatch, capsys):
    root, before = _pulled(env)
    locked = next(root.glob("snapshots/*"))
    real_access = os.access

    def access(path, mode, **kw):  # what a user who does not own the snapshot sees after chmod 555
        return False if Path(path) == locked and mode & os.W_OK else real_access(path, mode, **kw)

    monkeypatch.setattr(os, "access", access)
    code, out, err = run_main(["rm", REPO, "--yes"], monkeypatch, capsys)
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"error: cannot delete {REPO}: {locked} is not writable by this user; nothing was deleted; make it "
        f"writable (chmod -R u+w {root}) or run lfm2 rm as its owner"]
    assert tree(root) == before and local.find_cached(REPO) is not None


def test_cli_rm_that_cannot_move_the_model_deletes_nothing(env, fake_hub, monkeypatch, capsys):
    root, before = _pulled(env)

    def rename(src, dst):  # a read-only file system refuses even root
        raise OSError(errno.EROFS, "Read-only file system", str(src))

    monkeypatch.setattr(os, "rename", rename)
    code, out, err = run_main(["rm", REPO, "--yes"], monkeypatch, capsys)
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"error: cannot delete {REPO} from {root.parent}: Read-only file system; nothing was deleted"]
    assert tree(root) == before and local.find_cached(REPO) is not None


def test_cli_rm_failing_midway_leaves_no_half_model(env, fake_hub, monkeypatch, capsys):
    root, _ = _pulled(env)
    real_rmtree = local.shutil.rmtree

    def rmtree(path, *args, **kw):  # the first file goes, then the disk says no
        next(f for f in Path(path).rglob("*") if f.is_file()).unlink()
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(local.shutil, "rmtree", rmtree)
    code, out, err = run_main(["rm", REPO, "--yes"], monkeypatch, capsys)
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {REPO} is out of the cache, but its files in ")
    assert lines[0].endswith("could not all be deleted (Permission denied); delete that folder by hand")
    trash = Path(lines[0].split(" files in ")[1].split(" could not")[0])
    assert trash.parent == root.parent and trash.is_dir()
    assert not root.exists() and local.list_cached() == []  # gone as a whole, not listed as incomplete
    real_rmtree(trash)
