"""Fixtures of the whole suite: its own user folders, the tiny checkpoints (built once a session) and what tests
build from them; functions to import live in tests/helpers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers import Running, opening_template, serving, thinking_copy
from tests.tiny import make_checkpoint

if TYPE_CHECKING:
    import openai

    from lfm2cli.loading.loader import LoadedModel
    from lfm2cli.store.conversations import HistoryStore


@pytest.fixture(scope="session", autouse=True)
def own_user_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The tests never write to the user's cache or history (the model cache, the native kernel's build,
    chat history); tests that need their own folders set these again. Subprocesses inherit them. The native
    kernels keep their compiled tuning (no measuring at each load): tests/test_tuning.py turns the tuner on."""
    patch = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("user")
    patch.setenv("LFM2_CACHE", str(base / "cache"))
    patch.setenv("LFM2_HOME", str(base / "home"))
    patch.setenv("LFM2_TUNING", "off")
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
    """The MoE counterpart of `chat_ckpt`."""
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
def lm(chat_ckpt: Path) -> LoadedModel:
    """The chat checkpoint loaded in float32 on the CPU."""
    from lfm2cli.loading.loader import load

    return load(chat_ckpt, device="cpu", dtype="float32")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A history directory of the test's own."""
    monkeypatch.setenv("LFM2_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def store(home: Path) -> Iterator[HistoryStore]:
    """A history store in the test's own `home`."""
    from lfm2cli.store.conversations import HistoryStore

    with HistoryStore() as s:
        yield s


@pytest.fixture(scope="module")
def srv(chat_ckpt: Path) -> Iterator[Running]:
    """`lfm2 serve` on the chat checkpoint with every option at its default, one per test module (a module
    that needs other options defines its own `srv`)."""
    with serving(chat_ckpt) as running:
        yield running


@pytest.fixture(scope="module")
def client(srv: Running) -> openai.OpenAI:
    """The official openai client, pointed at this module's `srv`."""
    return srv.client()
