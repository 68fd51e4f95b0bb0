"""What a pruned checkpoint costs, measured beside its dense baseline: the bytes of its weight files on disk, and its
speed and peak memory on this machine (`save_pruned(measure_speed=True)`, `prune --measure_speed`).

Speed is measured in one process that holds both models and alternates them, so that both see the same machine load;
peak memory in a child process per model, which loads it and runs the same work, so that each figure is that of a
process doing only that. A small batch on one device: the cost of running the checkpoint as it is stored, not a
serving benchmark.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import safetensors_io as sio
from ..io_utils import check_arg_type

SEQ_LEN = 128  # prefill tokens, when the model's positions allow
NEW_TOKENS = 32  # decoded tokens, when the model's positions allow
PROMPT_TOKENS = 8  # the prompt the decode starts from
REPEATS = 5
SPEEDS = ("prefill_tokens_per_s", "decode_tokens_per_s")

_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# The child process of one memory measure: the parent's copy of this package, whatever the child's cwd.
_CHILD = ("import json, sys; from hf_weightprune.publish.measure import _peak_memory_child; "
          "print(json.dumps(_peak_memory_child(*sys.argv[1:])))")


def weight_files(folder: str | os.PathLike) -> dict[str, Any]:
    """The weight files of a safetensors checkpoint as they are on disk: their bytes and the dtype they store.

    Args:
        folder (`str` or `os.PathLike`): a checkpoint folder (`model.safetensors` or a sharded index).

    Returns:
        `dict[str, Any]`: `{"bytes": int, "dtype": str, "num_parameters": int}`: the summed size of the files the
        checkpoint's weight map names (headers included), the floating dtype holding most of its elements
        (`"float32"`, `"bfloat16"`, ...), and the elements they store (a tied weight is stored once).

    Raises:
        FileNotFoundError: the folder holds no safetensors weights.
        ValueError: a bad index or header.
    """
    folder = os.fspath(folder)
    shards = sorted(set(sio.weight_map(folder).values()))
    elements: dict[str, int] = {}
    total = 0
    for shard in shards:
        for name, info in sio.read_header(os.path.join(folder, shard)).items():
            if name != "__metadata__":
                total += math.prod(info["shape"])
                if info["dtype"] in _TORCH_DTYPES:
                    elements[info["dtype"]] = elements.get(info["dtype"], 0) + math.prod(info["shape"])
    dtype = _TORCH_DTYPES[max(elements, key=elements.get)] if elements else None
    # the parameters say which model the baseline was (the card names it: dense, or a pruned input)
    return {"bytes": sum(os.path.getsize(os.path.join(folder, s)) for s in shards), "dtype": dtype,
            "num_parameters": total}


def _config_of(fn: str, name: str, value: Any):
    """The config of a model given as a module or a local folder, after checking it is a causal LM."""
    from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if isinstance(value, nn.Module):
        if not isinstance(value, PreTrainedModel) or not value.can_generate():
            raise ValueError(f"{fn}: {name} is a {type(value).__name__}, not a causal LM that generates (a "
                             "PreTrainedModel such as LlamaForCausalLM)")
        return value.config
    check_arg_type(fn, name, value, (str, os.PathLike), "a causal LM (a PreTrainedModel or a local model folder)")
    path = os.fspath(value)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{fn}: {name} {path} is not a local model folder (no config.json)")
    config: PretrainedConfig = AutoConfig.from_pretrained(path)
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    causal = {causal} if isinstance(causal, str) else set(causal or ())
    # a base model's folder (`LlamaModel`) would load as a causal LM with a random head: its architecture says so
    if not causal or (config.architectures and not causal & set(config.architectures)):
        raise ValueError(f"{fn}: {name} {path} is not a causal LM (architectures {config.architectures}, "
                         f"AutoModelForCausalLM loads {sorted(causal) or 'none'} for {config.model_type!r})")
    return config


def _check_int(fn: str, name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{fn}: {name} must be an int >= {low}; got {value!r}")


def check_measure_inputs(model: Any, baseline: Any = None, *, seq_len: int | None = None,
                         new_tokens: int | None = None, repeats: int = REPEATS, warmup: int = 1,
                         threads: int | None = None, fn: str = "measure_model") -> tuple[int, int]:
    """Refuse, before any work, what [`measure_model`] cannot measure; returns the `(seq_len, new_tokens)` it uses.

    Args:
        model, baseline, seq_len, new_tokens, repeats, warmup, threads: as [`measure_model`].
        fn (`str`, *optional*, defaults to `"measure_model"`): the public function named in the messages.

    Returns:
        `tuple[int, int]`: the prefill length and the decoded tokens, defaults capped by the model's positions.

    Raises:
        TypeError: a model that is neither a module nor a folder path.
        FileNotFoundError: a folder without `config.json`.
        ValueError: not a causal LM, a baseline with another vocabulary, two modules of different dtypes or devices,
            a count below its minimum, or lengths past the model's positions.
    """
    _check_int(fn, "repeats", repeats, 1)
    _check_int(fn, "warmup", warmup, 0)
    if threads is not None:
        _check_int(fn, "threads", threads, 1)
    config = _config_of(fn, "model", model)
    text = config.get_text_config()
    if isinstance(model, nn.Module) and isinstance(baseline, nn.Module):  # both run as they are: like with like
        (p, q) = next(model.parameters()), next(baseline.parameters())
        if (p.device, p.dtype) != (q.device, q.dtype):
            raise ValueError(f"{fn}: the model is {p.dtype} on {p.device}, the baseline {q.dtype} on {q.device}: "
                             "measure them in one dtype on one device")
    if baseline is not None:
        dense = _config_of(fn, "baseline", baseline).get_text_config()
        if dense.vocab_size != text.vocab_size:
            raise ValueError(f"{fn}: baseline has a vocabulary of {dense.vocab_size}, the model {text.vocab_size}: "
                             "the baseline must be the dense model this one was pruned from")
    positions = getattr(text, "max_position_embeddings", None) or SEQ_LEN + NEW_TOKENS
    seq_len = min(SEQ_LEN, positions) if seq_len is None else seq_len
    new_tokens = min(NEW_TOKENS, positions - PROMPT_TOKENS) if new_tokens is None else new_tokens
    _check_int(fn, "seq_len", seq_len, PROMPT_TOKENS)
    _check_int(fn, "new_tokens", new_tokens, 1)
    if seq_len > positions or PROMPT_TOKENS + new_tokens > positions:
        raise ValueError(f"{fn}: seq_len={seq_len} or {PROMPT_TOKENS} prompt + new_tokens={new_tokens} exceeds the "
                         f"model's {positions} positions")
    return seq_len, new_tokens


def check_baseline(fn: str, model: nn.Module, baseline: Any, measure_speed: Any) -> str | None:
    """A writer's `measure_speed` and `baseline` (`save_pruned`), checked before any work.

    Returns:
        `str` or `None`: the baseline's folder, whose weight files are recorded beside the written ones.

    Raises:
        TypeError, FileNotFoundError, ValueError: as [`check_measure_inputs`] with `measure_speed`; a model in memory
            without it (it would be unused); a folder without safetensors weights.
    """
    check_arg_type(fn, "measure_speed", measure_speed, bool, "a bool")
    if measure_speed:
        check_measure_inputs(model, baseline, fn=fn)
    elif isinstance(baseline, nn.Module):
        raise ValueError(f"{fn}: a baseline model in memory is only used by measure_speed=True; pass "
                         "measure_speed=True, or the dense model's folder to record its file size")
    if baseline is None or isinstance(baseline, nn.Module):
        return None
    check_arg_type(fn, "baseline", baseline, (str, os.PathLike), "the dense model or its folder")
    if sio.find_weights_file(baseline) is None:
        raise FileNotFoundError(f"{fn}: baseline {os.fspath(baseline)} holds no safetensors weights; pass the dense "
                                "model's folder")
    return os.fspath(baseline)


def _load(path: str, dtype: str, device: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _run_once(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """One prefill (no cache) and one greedy decode (KV cache) of `model`: `(prefill, decode)` in tokens/s."""
    from transformers import GenerationConfig

    device = ids.device
    _sync(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(device)
    prefill = ids.numel() / (time.perf_counter() - start)
    prompt = ids[:, :PROMPT_TOKENS]
    greedy = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                              pad_token_id=model.config.get_text_config().pad_token_id or 0)
    start = time.perf_counter()
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=greedy)
    _sync(device)
    decode = (out.shape[1] - PROMPT_TOKENS) / (time.perf_counter() - start)
    return prefill, decode


def _token_ids(vocab_size: int, seq_len: int, device) -> torch.Tensor:
    """The same tokens for every model and process: a fixed seed, not the global generator."""
    return torch.randint(0, vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(device)


def _peak_memory_child(folder: str, dtype: str, device: str, threads: str, seq_len: str, new_tokens: str) -> dict:
    """Child process: load one model, run one prefill and decode, return the peak memory of this process."""
    torch.set_num_threads(int(threads))
    model = _load(folder, dtype, device)
    ids = _token_ids(model.config.get_text_config().vocab_size, int(seq_len), device)
    _run_once(model, ids, int(new_tokens))
    if torch.device(device).type == "cuda":
        return {"peak_cuda_allocated_bytes": int(torch.cuda.max_memory_allocated(device))}
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):  # kB: the high-water mark of the resident set
                return {"peak_rss_bytes": int(line.split()[1]) * 1024}
    try:
        import resource
    except ImportError:  # Windows: no portable peak without a dependency
        return {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_bytes": int(peak if sys.platform == "darwin" else peak * 1024)}  # macOS: bytes; others: KiB


def _peak_memory(folder: str, dtype: str, device: str, threads: int, seq_len: int, new_tokens: int) -> dict:
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _CHILD, folder, dtype, device, str(threads), str(seq_len),
                           str(new_tokens)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measuring the peak memory of {folder} failed in its child process: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure_model(
    model: nn.Module | str | os.PathLike,
    baseline: nn.Module | str | os.PathLike | None = None,
    *,
    seq_len: int | None = None,
    new_tokens: int | None = None,
    repeats: int = REPEATS,
    warmup: int = 1,
    threads: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Measure the speed and peak memory of a (pruned) causal LM, beside its dense baseline when given.

    What is measured, on one device, in this process, the two models alternating (pruned then dense, then dense then
    pruned, ...) after `warmup` runs of each, so that both see the same load:
    - prefill: one forward of batch 1 x `seq_len` tokens without cache, in tokens/s;
    - decode: greedy generation of `new_tokens` tokens after an 8-token prompt, with the KV cache, in tokens/s
      (the whole `generate` call is timed);
    each as median, min and max over `repeats`. Then, per model, a child process loads it and runs one prefill and
    one decode; its peak memory is read there: the high-water mark of its resident set (`VmHWM` of
    `/proc/self/status` on Linux, `ru_maxrss` on other Unix systems, nothing on Windows), or on CUDA
    `torch.cuda.max_memory_allocated` (the tensors of the process, not the CUDA context). Both include the Python,
    torch and transformers of a process, the same for both models.

    What is not measured: batched or concurrent serving, long contexts, other runtimes (vLLM, llama.cpp), quality.
    Tokens are random ids from a fixed seed, the same for both models.

    Args:
        model (`PreTrainedModel`, `str` or `os.PathLike`): the pruned causal LM, or its local folder (loaded in its
            stored dtype). A module is measured as it is (in eval mode) and saved to a temporary folder for its
            memory process.
        baseline (`PreTrainedModel`, `str` or `os.PathLike`, *optional*): the dense model it was pruned from, the
            same way; its vocabulary must be the model's.
        seq_len (`int`, *optional*): prefill tokens; defaults to 128, or the model's positions when fewer.
        new_tokens (`int`, *optional*): decoded tokens; defaults to 32, or what the model's positions leave.
        repeats (`int`, *optional*, defaults to 5): measured runs per model, at least 1.
        warmup (`int`, *optional*, defaults to 1): unmeasured runs per model first.
        threads (`int`, *optional*): CPU threads (`torch.set_num_threads`, restored after; the memory processes get
            the same); defaults to torch's current number.
        device (`str` or `torch.device`, *optional*): where to run; defaults to the device of `model` when it is a
            module, else the CPU. A module must already be there.

    Returns:
        `dict[str, Any]`: plain JSON-serialisable values: `device`, `device_name`, `threads`, `torch_version`,
        `transformers_version`, `dtype`, `seq_len`, `prompt_tokens`, `new_tokens`, `repeats`, `warmup`,
        `memory_measure` (`"VmHWM"`, `"ru_maxrss"`, `"torch.cuda.max_memory_allocated"` or `None`); `pruned` and
        `dense` (`None` without a baseline), each `{"num_parameters", "parameter_bytes", "prefill_tokens_per_s",
        "decode_tokens_per_s", "peak_rss_bytes"}` (speeds as `{"median", "min", "max"}`; on CUDA
        `peak_cuda_allocated_bytes` instead of `peak_rss_bytes`; no peak key when none could be read); `ratios`
        (`None` without a baseline): pruned / dense of each of those figures (speeds by their medians).

    Raises:
        TypeError: a model that is neither a module nor a folder path.
        FileNotFoundError: a folder without `config.json`.
        ValueError: (one line, before any work) not a causal LM, a baseline with another vocabulary, two modules
            of different dtypes or devices, a module not on `device`, `repeats` < 1, lengths past the model's
            positions.
        RuntimeError: a memory process failed (its last line of error).
    """
    import transformers

    seq_len, new_tokens = check_measure_inputs(model, baseline, seq_len=seq_len, new_tokens=new_tokens,
                                               repeats=repeats, warmup=warmup, threads=threads)
    modules = [m for m in (model, baseline) if isinstance(m, nn.Module)]
    if device is None:
        device = next(modules[0].parameters()).device if modules and model is modules[0] else "cpu"
    device = torch.device(device)
    for m in modules:
        where = next(m.parameters()).device
        if where != device:
            raise ValueError(f"measure_model: a model is on {where}, the measure runs on {device}: move it first")
    dtype = str(next(modules[0].parameters()).dtype).removeprefix("torch.") if modules else "auto"
    saved_threads = torch.get_num_threads()
    threads = threads or saved_threads
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="hf-weightprune-measure-") as tmp:
            named = {"pruned": model, "dense": baseline} if baseline is not None else {"pruned": model}
            folders = {}
            for name, m in named.items():
                if isinstance(m, nn.Module):
                    folders[name] = os.path.join(tmp, name)
                    m.save_pretrained(folders[name])  # what its memory process loads
                else:
                    folders[name] = os.fspath(m)
            loaded = {}
            for name, m in named.items():  # the pruned model first: a folder's stored dtype is then the baseline's
                loaded[name] = m if isinstance(m, nn.Module) else _load(os.fspath(m), dtype, str(device))
                dtype = str(next(loaded[name].parameters()).dtype).removeprefix("torch.")
            return _measure(loaded, folders, dtype=dtype, device=device, threads=threads, seq_len=seq_len,
                            new_tokens=new_tokens, repeats=repeats, warmup=warmup,
                            versions=(torch.__version__, transformers.__version__))
    finally:
        torch.set_num_threads(saved_threads)


def _measure(models: dict[str, nn.Module], folders: dict[str, str], *, dtype: str, device: torch.device,
             threads: int, seq_len: int, new_tokens: int, repeats: int, warmup: int, versions: tuple[str, str]
             ) -> dict[str, Any]:
    modes = {name: m.training for name, m in models.items()}
    vocab = models["pruned"].config.get_text_config().vocab_size
    ids = _token_ids(vocab, seq_len, device)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    try:
        for m in models.values():
            m.eval()
        for _ in range(warmup):
            for m in models.values():
                _run_once(m, ids, new_tokens)
        order = list(models)
        for r in range(repeats):
            for name in order if r % 2 == 0 else order[::-1]:  # alternate who goes first: the same load for both
                runs[name].append(_run_once(models[name], ids, new_tokens))
    finally:
        for name, m in models.items():
            m.train(modes[name])
    figures = {}
    for name, m in models.items():
        params = {id(p): p for p in m.parameters()}.values()  # a tied weight once
        figures[name] = {"num_parameters": sum(p.numel() for p in params),
                         "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
                         "prefill_tokens_per_s": _spread([r[0] for r in runs[name]]),
                         "decode_tokens_per_s": _spread([r[1] for r in runs[name]]),
                         **_peak_memory(folders[name], dtype, str(device), threads, seq_len, new_tokens)}
    memory_key = next((k for k in ("peak_rss_bytes", "peak_cuda_allocated_bytes") if k in figures["pruned"]), None)
    measure = {"peak_cuda_allocated_bytes": "torch.cuda.max_memory_allocated", None: None}.get(
        memory_key, "VmHWM" if Path("/proc/self/status").is_file() else "ru_maxrss")
    dense, ratios = figures.get("dense"), None
    if dense is not None:  # pruned / dense of every figure, a speed by its median
        keys = ["num_parameters", "parameter_bytes", *SPEEDS, *([memory_key] if memory_key else [])]
        value = lambda f, k: f[k]["median"] if isinstance(f[k], dict) else f[k]  # noqa: E731
        ratios = {k: value(figures["pruned"], k) / value(dense, k) for k in keys}
    return {"device": str(device), "device_name": _device_name(device), "threads": threads,
            "torch_version": versions[0], "transformers_version": versions[1], "dtype": dtype, "seq_len": seq_len,
            "prompt_tokens": PROMPT_TOKENS, "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
            "memory_measure": measure, "pruned": figures["pruned"], "dense": dense, "ratios": ratios}


def measured_section(folder: str | os.PathLike, *, dense_folder: str | os.PathLike | None = None,
                     speed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `measured` section of `sparsity.json`: the weight files of the written `folder` (and of the dense
    checkpoint's folder, when known), and the speed and memory that [`measure_model`] returned, if it ran.

    Args:
        folder (`str` or `os.PathLike`): the pruned folder, its weights written.
        dense_folder (`str` or `os.PathLike`, *optional*): the dense checkpoint's folder.
        speed (`dict`, *optional*): what [`measure_model`] returned.

    Returns:
        `dict[str, Any]`: `{"weight_files": {"bytes", "dtype"}, "dense_weight_files": {...} or None, "speed": ...}`.
    """
    return {"weight_files": weight_files(folder),
            "dense_weight_files": weight_files(dense_folder) if dense_folder is not None else None,
            "speed": speed}
