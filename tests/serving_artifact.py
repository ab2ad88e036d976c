"""One tiny random llama artifact (with a chat template) shared by the serving tests of a pytest run."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

from tiny_models import make_tiny_model

BYTE_VOCAB = 260  # '<pad>', '<s>', '</s>', '<unk>', then one token per byte

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


@functools.lru_cache(maxsize=1)
def tiny_artifact() -> Path:
    """Build it once per process (~5 s) into a temporary folder removed at exit."""
    from graphopt.build.artifact import BuildOptions, build
    from graphopt.passes.pipeline import load_recipe
    from graphopt.core.progress import QUIET

    root = Path(tempfile.mkdtemp(prefix="graphopt-serving-"))
    atexit.register(shutil.rmtree, root, True)
    hf_dir = make_tiny_model("llama", root / "hf")
    config_path = hf_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    out = root / "artifact"
    build(str(hf_dir), BuildOptions(load_recipe("ort-cpu"), out), QUIET)
    return out


def byte_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer with no merges (as GPT-2/SmolLM2 encode bytes): any text, one token per byte,
    so grammar libraries can spell JSON with it; the chat template of :func:`tiny_artifact`."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + pre_tokenizers.ByteLevel.alphabet())}
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)


@functools.lru_cache(maxsize=1)
def byte_artifact() -> Path:
    """A tiny random llama with the byte-level tokenizer (structured output tests), built once per process."""
    from graphopt.build.artifact import BuildOptions, build
    from graphopt.passes.pipeline import load_recipe
    from graphopt.core.progress import QUIET

    root = Path(tempfile.mkdtemp(prefix="graphopt-bytes-"))
    atexit.register(shutil.rmtree, root, True)
    hf_dir = make_tiny_model("llama", root / "hf", vocab_size=BYTE_VOCAB)
    byte_tokenizer(hf_dir)  # replaces the word-level one
    out = root / "artifact"
    build(str(hf_dir), BuildOptions(load_recipe("ort-cpu"), out), QUIET)
    return out


class ServerThread:
    """An in-process ``OpenAIServer`` under uvicorn on a free 127.0.0.1 port, in a daemon thread."""

    def __init__(self, config, llm=None) -> None:
        from graphopt.runtime.server import OpenAIServer, uvicorn_server

        self.server = OpenAIServer(config, llm)
        self.uvicorn = uvicorn_server(self.server, port=0, log_level="warning")
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.port = 0

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        self.port = self.uvicorn.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def metric(port: int, name: str) -> float:
    """One sample's value from /metrics (0.0 when absent), e.g. 'graphopt_requests_total{status="cancelled"}'."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
