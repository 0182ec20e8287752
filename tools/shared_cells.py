# %%
# @title Shared 1/7: imports, the device (cuda → mps → cpu) and the run profile
import hashlib
import inspect
import io
import json
import math
import os
import random
import time
import zlib
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        try:  # a card this torch has no kernels for (Kaggle's old P100) fails here
            torch.ones(1, device="cuda").add_(1)
            return torch.device("cuda")
        except RuntimeError as err:
            print(f"Skipping CUDA ({torch.cuda.get_device_name(0)}: {err}); on Kaggle, choose the "
                  "T4. Running on the CPU.")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def resolve_profile(requested, device: torch.device) -> str:
    gpu = device.type in ("cuda", "mps")
    profile = requested or os.environ.get("DLCV_PROFILE") or ("full" if gpu else "cpu")
    if profile not in ("smoke", "cpu", "full"):
        raise ValueError(f"PROFILE or $DLCV_PROFILE is {profile!r}: use smoke, cpu or full.")
    return profile


# %%
# @title Shared 2/7: precision by a fixed rule, autocast, one optimizer step
def cpu_native_bf16(cpuinfo_text=None) -> bool:  # AVX512-BF16, AMX or ARM BF16
    info = Path("/proc/cpuinfo")
    text = cpuinfo_text if cpuinfo_text is not None else info.read_text() if info.exists() else ""
    return any(flag in ("avx512_bf16", "amx_bf16", "bf16") for line in text.splitlines()
               if line.split(":")[0].strip() in ("flags", "Features")
               for flag in line.split(":", 1)[1].split())


def choose_precision(device: torch.device, cpu_bf16_gains: bool, native_bf16=None) -> dict:
    forced = os.environ.get("DLCV_PRECISION", "auto").lower()
    if forced not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"DLCV_PRECISION={forced!r}: use auto, fp32, bf16 or fp16.")
    cuda = device.type == "cuda"
    native = cpu_native_bf16() if native_bf16 is None else native_bf16
    name, reason = (
        (forced, "forced by DLCV_PRECISION") if forced != "auto"
        else ("bf16", "CUDA sm_80+") if cuda and torch.cuda.get_device_capability(device)[0] >= 8
        else ("fp16", "CUDA before sm_80, with a gradient scaler") if cuda
        else ("fp32", device.type) if device.type != "cpu"
        else ("fp32", "CPU without native bf16") if not native
        else ("bf16", "native bf16, and this model gains") if cpu_bf16_gains
        else ("fp32", "native bf16, but no gain for this model"))
    return dict(name=name, amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(name),
                device_type=device.type, reason=reason)


def autocast(precision: dict):  # for training steps (metrics: fp32)
    dtype = precision["amp_dtype"]
    return torch.autocast(precision["device_type"], dtype=dtype, enabled=bool(dtype))


def make_scaler(precision: dict):  # one per training run; a pass-through unless fp16
    return torch.amp.GradScaler(precision["device_type"], enabled=precision["name"] == "fp16")


def optimizer_step(loss, optimizer, scaler, scheduler=None) -> bool:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    if taken := scaler.get_scale() >= scale:  # the fp16 scale falls when a step is skipped (inf)
        scheduler is None or scheduler.step()
    return taken


# %%
# @title Shared 3/7: seeds, folders, the first line of output
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_folders() -> dict:
    env = os.environ.get
    return dict(results=Path(env("DLCV_RESULTS_DIR") or "results"), data=env("DLCV_DATA_DIR"),
                cache=Path(env("DLCV_CACHE_DIR") or Path.home() / ".cache" / "dlcv"),
                offline=env("DLCV_OFFLINE", "").lower() in ("1", "true", "yes"))


def describe_run(profile, device, precision, data_source, data_origin, runtime, store) -> str:
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{device.type}, {torch.get_num_threads()} threads")
    print(line := f"profile={profile} | device={where} | precision={precision['name']} "
                  f"({precision['reason']}) | torch {torch.__version__} | data: {data_source} from "
                  f"{data_origin} | expected runtime: {runtime} | training runs kept in "
                  f"{store.folder or 'no store (RUNS=off)'}")
    return line


# %%
# @title Shared 4/7: the noise rule, lessons checked by the run, the results file
def beyond_noise(a, b, paired: bool) -> tuple:
    """(mean(a) − mean(b), its SE, beyond 2 SE?); paired: the same items were scored."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if min(len(a), len(b)) < 2 or (paired and a.shape != b.shape):
        raise ValueError(f"beyond_noise: ≥ 2 scores a side, paired alike: {a.shape}, {b.shape}")
    se = (np.std(a - b, ddof=1) / math.sqrt(len(a)) if paired
          else math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b)))
    return float(a.mean() - b.mean()), float(se), bool(abs(a.mean() - b.mean()) > 2 * se)


def record_lesson(lessons: dict, name: str, holds, evidence: str, unavailable=None) -> None:
    lessons[name] = dict(holds=None if unavailable else bool(holds), evidence=evidence,
                         unavailable=unavailable)
    print(f"{'–' if unavailable else '✓' if holds else '✗'} {name}: {evidence}"
          + (f" (not tested: {unavailable})" if unavailable else ""))


def save_results(folders, notebook, profile, device, precision, data_source, seconds, metrics,
                 lessons, store) -> Path:
    loaded = sum(arm["loaded"] for arm in store.arms.values())
    trained = len(store.arms) - loaded
    print(f"training runs: {loaded} loaded from the store, {trained} trained")
    path = Path(folders["results"], f"{notebook}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(
        notebook=notebook, profile=profile, device=device.type, precision=precision["name"],
        torch=torch.__version__, data_source=data_source, seconds=round(seconds, 1),
        runs_loaded=loaded, runs_trained=trained, runs=store.arms, metrics=metrics,
        lessons=lessons),
        indent=1, ensure_ascii=False, allow_nan=False, default=lambda v: v.tolist()))
    return path


# %%
# @title Shared 5/7: finding the data, random samples, exercise checks
class DataNotFoundError(RuntimeError): ...


class DataLayoutError(RuntimeError): ...


def find_data(name, locate, folders, fixes, download=None, kaggle_root="/kaggle/input") -> tuple:
    """(folder, origin, "real"/"synthetic"); `locate(path)`: the data folder in `path`, or None."""
    cache, level, error = Path(folders["cache"]) / name, [Path(kaggle_root)], "not needed"
    hit, origin = folders["data"] and locate(Path(folders["data"]) / name), "DLCV_DATA_DIR"
    for _ in range(4 * (not hit)):  # Kaggle input mounts, four folders deep
        level = [sub for f in level if f.is_dir() for sub in sorted(f.iterdir()) if sub.is_dir()]
        if hit := next(filter(None, map(locate, level)), None):
            origin = "Kaggle input"
            break
    try:
        if not hit and (hit := locate(cache)):
            origin = "download cache"
        elif not hit:
            if folders["offline"] or not download:
                raise RuntimeError("skipped: DLCV_OFFLINE=1" if download else "none for this data")
            if not (hit := locate(Path(download(cache)))):
                raise DataLayoutError("finished, but the files are not in the expected layout")
            origin = "download"
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
    if hit:
        synthetic = (Path(hit) / "SYNTHETIC").exists()
        return hit, f"{origin} ({hit})", "synthetic" if synthetic else "real"
    fixes = "".join(f"\n  {i}. {fix}" for i, fix in enumerate(fixes, 1))
    raise DataNotFoundError(f"Could not find the {name} data. Tried: $DLCV_DATA_DIR/{name} "
                            f"({folders['data'] or 'not set'}), Kaggle inputs under {kaggle_root}, "
                            f"the cache {cache}, a download ({error}).\nFixes:{fixes}")


def sample_indices(n: int, k: int, seed: int, labels=None) -> np.ndarray:
    """Sorted indices of a seeded random sample of `k` of `n` items; with `labels`, stratified."""
    rng, k = np.random.default_rng(seed), min(int(k), n)
    labels = np.zeros(n) if labels is None else np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts * k / n).astype(int)
    quota[np.argsort(-(counts * k / n - quota), kind="stable")[: k - quota.sum()]] += 1
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), q, replace=False)
                                   for c, q in zip(classes, quota)]))


class ExerciseError(AssertionError): ...  # says what is wrong and where to look


def expect(condition, exercise: str, failure: str, hint: str) -> None:
    if not condition:
        raise ExerciseError(f"✗ {exercise}: {failure}\n  Hint: {hint}")


def passed(exercise: str, what: str) -> None:
    print(f"✓ {exercise}: {what}")


# %%
# @title Shared 6/7: resumable runs: a run's key (settings, data, code, weights)
def code_of(*roots) -> str:
    """The source of the notebook's functions (methods too) that `roots` reach by name."""
    seen, todo = set(), list(roots)
    while todo:
        f = todo.pop()
        f = f if inspect.isfunction(f) or inspect.isclass(f) else type(f)  # objects: their class
        if getattr(f, "__module__", 0) != roots[0].__module__ or f in seen:
            continue
        seen.add(f)
        if inspect.isclass(f):
            todo += [*f.__bases__, *vars(f).values()]
        elif inspect.isfunction(f):
            codes = [f.__code__]
            for code in codes:  # with its lambdas, comprehensions
                codes += [c for c in code.co_consts if inspect.iscode(c)]
                todo += [f.__globals__.get(name) for name in code.co_names]
    return "".join(sorted(inspect.getsource(f) for f in seen if inspect.isfunction(f)))


def fingerprint(x):  # tensors, arrays, models: a hash
    if isinstance(x, nn.Module | dict):
        x = list((x.state_dict() if isinstance(x, nn.Module) else x).items())
    if isinstance(x, list | tuple):
        return [fingerprint(v) for v in x]
    if isinstance(x, np.ndarray | torch.Tensor):
        t = torch.as_tensor(x).detach().flatten()
        t = t[:: max(1, t.numel() >> 20)].cpu().contiguous().view(torch.uint8).numpy()
        return f"{tuple(x.shape)} {x.dtype} {hashlib.sha1(t).hexdigest()}"
    return x.__qualname__ if callable(x) else str(x)


# %%
# @title Shared 7/7: resumable runs: the store (finished runs kept, loaded while unchanged)
class RunStore:
    def __init__(self, folders, notebook, profile, seed, device, precision, switch=None):
        if (switch := switch or os.environ.get("DLCV_RUNS", "on")) not in ("on", "off"):
            raise ValueError(f"RUNS or $DLCV_RUNS is {switch!r}: use on or off.")
        self.folder = Path(folders["cache"], "runs", notebook) if switch == "on" else None
        self.context = [profile, seed, device.type, precision["name"], torch.__version__[:4]]
        self.arms = {}

    def train_or_load(self, name, build, train, /, **depends):
        """(model, history): `train(build())` seeded by `name`, or loaded while its key holds:
        `depends`, the code build and train reach, the initial weights, the run's context."""
        seed_everything(seed := (self.context[1] + zlib.crc32(name.encode())) % 2**31)
        model = build()
        key = repr([name, self.context, code_of(build, train, *depends.values()),
                    fingerprint([depends, model])])
        key = hashlib.sha1(key.encode()).hexdigest()[:12]
        path = self.folder and self.folder / f"{name}-{key}.pt"
        try:
            entry = torch.load(path, weights_only=True)
            model and model.load_state_dict(entry["state"])
            print(f"{name}: loaded (trained {entry['date']} in {entry['seconds']:.0f} s)")
        except Exception as err:  # not stored (yet), or corrupt
            entry = path and path.exists() and print(f"{name}: unreadable ({err}); training again")
        if not entry:
            start, history, buffer = time.perf_counter(), train(model), io.BytesIO()
            torch.save(dict(state=model and model.state_dict(), history=history, loaded=True,
                            seconds=time.perf_counter() - start,
                            date=time.strftime("%Y-%m-%d %H:%M")), buffer)
            if path:  # replacing this arm's earlier runs
                [old.unlink() for old in self.folder.glob(f"{name}-{'?' * 12}.pt")]
                self.folder.mkdir(parents=True, exist_ok=True)
                path.write_bytes(buffer.getvalue())
            buffer.seek(0)  # as a later run will load it
            entry = torch.load(buffer, weights_only=True) | {"loaded": False}
        self.arms[name] = {k: entry[k] for k in ("loaded", "date", "seconds")}
        seed_everything(seed + 1)  # what follows draws the same numbers, loaded or trained
        return model and model.eval(), entry["history"]
