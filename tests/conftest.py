from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.tiny import make_checkpoint


@pytest.fixture(scope="session", autouse=True)
def own_user_dirs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The tests never write to the user's cache or history (the model cache, the native kernel's build,
    chat history); tests that need their own folders set these again. Subprocesses inherit them."""
    patch = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("user")
    patch.setenv("LFM2_CACHE", str(base / "cache"))
    patch.setenv("LFM2_HOME", str(base / "home"))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def dense_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LFM2 checkpoint (float32, single file)."""
    return make_checkpoint(tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="session")
def moe_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LFM2-MoE checkpoint (float32, single file)."""
    return make_checkpoint(tmp_path_factory.mktemp("moe"), moe=True)


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dense checkpoint with a trained tokenizer and the LFM2 chat template: runs end to end."""
    from tests.tiny_tokenizer import make_tokenizer

    path = make_checkpoint(tmp_path_factory.mktemp("chat"))
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def chat_moe_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_tokenizer import make_tokenizer

    path = make_checkpoint(tmp_path_factory.mktemp("chatmoe"), moe=True)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def endless_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Greedy decoding never picks EOS here (its head row is zero) and the context is long: generation runs
    until it is interrupted."""
    from safetensors.torch import load_file, save_file

    from tests.tiny_tokenizer import make_tokenizer

    path = make_checkpoint(tmp_path_factory.mktemp("endless"), tie_word_embeddings=False,
                           max_position_embeddings=60_000)
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"][7] = 0
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    make_tokenizer(path)
    return path


@contextmanager
def native_at_level(level: str, directory: Path) -> Iterator[None]:
    """lfm2's native library built and loaded at one ISA level (LFM2_NATIVE_ISA); afterwards the process goes
    back to the level it would pick itself."""
    from lfm2cli.kernels import native

    saved = os.environ.get("LFM2_NATIVE_ISA")
    os.environ["LFM2_NATIVE_ISA"] = level
    native.reset()
    try:
        native.load(directory)
        yield
    finally:
        if saved is None:
            os.environ.pop("LFM2_NATIVE_ISA", None)
        else:
            os.environ["LFM2_NATIVE_ISA"] = saved
        native.reset()


def run_main(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple:
    """The real entry point in this process, its error boundary included (so a test can patch the library):
    (exit code, stdout, stderr)."""
    from lfm2cli.cli import main

    monkeypatch.delenv("LFM2_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["lfm2", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


# ---- shared by the chat, generate, structured-output and serve tests

def thinking_copy(src: Path, dst: Path, template: str | None = None) -> Path:
    """A copy of `src` whose tokenizer has `<think>`/`</think>` as special tokens (and `template`, if given)."""
    import shutil

    from tests.test_detokenize import add_think_tokens
    from tests.tiny_tokenizer import make_tokenizer

    path = Path(shutil.copytree(src, dst))
    if template is not None:
        make_tokenizer(path, chat_template=template)
    add_think_tokens(path)
    return path


def template_copy(src: Path, dst: Path, template: str, as_file: bool = True) -> Path:
    """A copy of the checkpoint `src` at `dst` whose chat template is `template`, written to chat_template.jinja
    (`as_file`) or to tokenizer_config.json's `chat_template`; returns the file that holds it."""
    import json
    import shutil

    shutil.copytree(src, dst)
    if as_file:
        (dst / "chat_template.jinja").write_text(template, encoding="utf-8")
        return dst / "chat_template.jinja"
    config_file = dst / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["chat_template"] = template
    config_file.write_text(json.dumps(config), encoding="utf-8")
    return config_file


def opening_template() -> str:
    """The test template with a generation prompt that opens the block, as some thinking models' templates do."""
    from tests.tiny_tokenizer import BUILTIN_TEMPLATE

    old = "{{- '<|im_start|>assistant\\n' -}}"
    assert BUILTIN_TEMPLATE.count(old) == 1
    return BUILTIN_TEMPLATE.replace(old, "{{- '<|im_start|>assistant\\n<think>\\n' -}}")


@pytest.fixture(scope="session")
def think_ckpt(chat_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chat checkpoint with `<think>`/`</think>` as special tokens (as LFM2.5's tokenizer has them)."""
    return thinking_copy(chat_ckpt, tmp_path_factory.mktemp("think") / "ckpt")


@pytest.fixture(scope="session")
def opening_ckpt(chat_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A template whose generation prompt opens the block (`<|im_start|>assistant\\n<think>\\n`); random weights
    never close it."""
    return thinking_copy(chat_ckpt, tmp_path_factory.mktemp("opening") / "ckpt", template=opening_template())


@pytest.fixture(scope="module")
def lm(chat_ckpt: Path):
    """The chat checkpoint loaded in float32 on the CPU."""
    from lfm2cli.loading.loader import load

    return load(chat_ckpt, device="cpu", dtype="float32")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A history directory of the test's own."""
    monkeypatch.setenv("LFM2_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def store(home: Path):
    from lfm2cli.store.conversations import HistoryStore

    with HistoryStore() as s:
        yield s
