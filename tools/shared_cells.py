# %%
# @title Shared 1/5: imports, the device (cuda → mps → cpu) and the run profile
import json
import math
import os
import random
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm


def pick_device() -> torch.device:
    """cuda → mps → cpu; a CUDA card this torch build has no kernels for (Kaggle's old P100) is skipped."""
    if torch.cuda.is_available():
        try:
            torch.ones(1, device="cuda").add_(1)  # fails with "no kernel image is available" on such a card
            return torch.device("cuda")
        except RuntimeError as err:
            print(f"Skipping CUDA ({torch.cuda.get_device_name(0)}: {err}). Fix: on Kaggle choose the T4 "
                  "accelerator; elsewhere install a torch build for this card. Running on the CPU instead.")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def resolve_profile(requested, device: torch.device) -> str:  # PROFILE, $DLCV_PROFILE, else full on a GPU, cpu
    profile = requested or os.environ.get("DLCV_PROFILE") or ("full" if device.type in ("cuda", "mps") else "cpu")
    if profile not in ("smoke", "cpu", "full"):
        raise ValueError(f"Unknown run profile {profile!r} (PROFILE or $DLCV_PROFILE): use smoke, cpu or full.")
    return profile


# %%
# @title Shared 2/5: precision by a fixed rule, autocast, and one optimizer step (with fp16's gradient scaler)
def cpu_native_bf16(cpuinfo_text=None) -> bool:
    """Does the CPU compute bf16 natively (AVX512-BF16, AMX, ARM BF16)? Read from Linux's CPU flags."""
    info = Path("/proc/cpuinfo")  # absent on macOS and Windows: no native bf16 assumed there
    text = cpuinfo_text if cpuinfo_text is not None else (info.read_text() if info.exists() else "")
    return any(flag in ("avx512_bf16", "amx_bf16", "bf16") for line in text.splitlines()
               if line.split(":")[0].strip() in ("flags", "Features") for flag in line.split(":", 1)[1].split())


def choose_precision(device: torch.device, cpu_bf16_gains: bool, native_bf16=None) -> dict:
    """Fixed rule: CUDA bf16 from sm_80, else fp16 + scaler (T4); MPS fp32; CPU bf16 if native and the model
    gains (`cpu_bf16_gains`, measured by the maintainers), else fp32. $DLCV_PRECISION overrides it."""
    forced = os.environ.get("DLCV_PRECISION", "auto").lower()
    if forced not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"DLCV_PRECISION={forced!r}: use auto, fp32, bf16 or fp16.")
    name, reason = (
        (forced, f"forced by DLCV_PRECISION={forced}") if forced != "auto"
        else ("bf16", "CUDA from sm_80") if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
        else ("fp16", "CUDA before sm_80: fp16 with a gradient scaler") if device.type == "cuda"
        else ("fp32", f"{device.type}: fp32") if device.type != "cpu"
        else ("fp32", "CPU without native bf16") if not (cpu_native_bf16() if native_bf16 is None else native_bf16)
        else ("bf16", "CPU with native bf16; this model trains faster in it") if cpu_bf16_gains
        else ("fp32", "CPU with native bf16, but this model measured no faster in it"))
    return dict(name=name, amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(name),
                device_type=device.type, reason=reason)


def autocast(precision: dict):  # for a training step's forward pass; metrics are computed outside it, in fp32
    return torch.autocast(precision["device_type"], dtype=precision["amp_dtype"], enabled=bool(precision["amp_dtype"]))


def make_scaler(precision: dict):  # one per training run: active in fp16, a pass-through otherwise
    return torch.amp.GradScaler(precision["device_type"], enabled=precision["name"] == "fp16")


def optimizer_step(loss, optimizer, scaler, scheduler=None) -> bool:
    """Backward and update. A step the fp16 scaler skips (inf/NaN gradients) does not advance the scheduler."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    if taken := scaler.get_scale() >= scale:  # the scaler lowers its scale exactly when it skipped the step
        scheduler is None or scheduler.step()
    return taken


# %%
# @title Shared 3/5: seeds, folders, the first line of output
def seed_everything(seed: int) -> None:  # same seed, same numbers (on a GPU the last bits may differ)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_folders() -> dict:  # results, data, download cache (~/.cache/dlcv, on Kaggle too), offline switch
    env = os.environ.get
    return dict(results=Path(env("DLCV_RESULTS_DIR") or "results"), data=env("DLCV_DATA_DIR") or None,
                cache=Path(env("DLCV_CACHE_DIR") or Path.home() / ".cache" / "dlcv"),
                offline=env("DLCV_OFFLINE", "").lower() in ("1", "true", "yes"))


def describe_run(profile, device, precision, data_source, data_origin, runtime) -> str:
    """The first line every notebook prints (CPU threads: torch's default, or $OMP_NUM_THREADS when set)."""
    threads = f"{torch.get_num_threads()} threads"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}, {threads}"
    print(line := f"profile={profile} | device={where} | precision={precision['name']} ({precision['reason']}) | "
                  f"torch {torch.__version__} | data: {data_source} from {data_origin} | expected runtime: {runtime}")
    return line


# %%
# @title Shared 4/5: the noise rule, lessons checked by the run, the results file
def beyond_noise(a, b, paired: bool) -> tuple:
    """(mean(a) − mean(b), its SE, |difference| > 2 SE) from per-item scores; paired: the same items were
    scored (SE of the per-item differences); unpaired: √(SE_a² + SE_b²)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if min(len(a), len(b)) < 2 or (paired and a.shape != b.shape):
        raise ValueError(f"beyond_noise needs ≥ 2 scores a side (paired: the same items), got {a.shape}, {b.shape}")
    se = (np.std(a - b, ddof=1) / math.sqrt(len(a)) if paired
          else math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b)))
    return float(a.mean() - b.mean()), float(se), bool(abs(a.mean() - b.mean()) > 2 * se)


def record_lesson(lessons: dict, name: str, holds, evidence: str, unavailable=None) -> None:
    """Print a claim's verdict (✓ held, ✗ did not, – not tested, with the reason) and keep it for the results."""
    lessons[name] = {"holds": None if unavailable else bool(holds), "evidence": evidence, "unavailable": unavailable}
    print(f"{'–' if unavailable else '✓' if holds else '✗'} {name}: {evidence}"
          + (f" (not tested: {unavailable})" if unavailable else ""))


def save_results(folders, notebook, profile, device, precision, data_source, seconds, metrics, lessons) -> Path:
    """Write `<results>/<notebook>.json` (numpy and torch values as plain numbers; NaN or infinity refused)."""
    record = dict(notebook=notebook, profile=profile, device=device.type, precision=precision["name"],
                  torch=torch.__version__, data_source=data_source, seconds=round(float(seconds), 1),
                  metrics=metrics, lessons=lessons)
    (path := Path(folders["results"]) / f"{notebook}.json").parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False, default=lambda v: v.tolist()))
    return path


# %%
# @title Shared 5/5: finding the data (one finder for all), random samples, exercise checks
class DataNotFoundError(RuntimeError): ...  # no copy found or fetched: the message lists what was tried, and fixes


class DataLayoutError(RuntimeError): ...  # the data is there but broken: the message names the file or folder


def find_data(name, locate, folders, fixes, download=None, kaggle_root="/kaggle/input") -> tuple:
    """(folder, origin, "real"/"synthetic"): $DLCV_DATA_DIR/<name>, Kaggle input, cache, `download(cache)`.
    `locate(path)` gives the data folder at or in `path`, or None; the tests' synthetic data holds SYNTHETIC."""
    found = lambda path, origin: (path, origin, "synthetic" if (Path(path) / "SYNTHETIC").exists() else "real")
    tried, cache = [], Path(folders["cache"]) / name
    if folders["data"] and (hit := locate(Path(folders["data"]) / name)):
        return found(hit, f"DLCV_DATA_DIR ({hit})")
    tried.append(f"DLCV_DATA_DIR/{name}: " + ("missing or not this layout" if folders["data"] else "not set"))
    level = [Path(kaggle_root)] if Path(kaggle_root).is_dir() else []
    for _ in range(4):  # a Kaggle input mount, searched four folders deep
        level = [sub for folder in level for sub in sorted(folder.iterdir()) if sub.is_dir()]
        if hit := next((h for h in map(locate, level) if h), None):
            return found(hit, f"Kaggle input ({hit})")
    tried.append(f"Kaggle input {kaggle_root}: " + ("no match" if Path(kaggle_root).is_dir() else "not found"))
    if hit := locate(cache):
        return found(hit, f"download cache ({hit})")
    try:
        if folders["offline"] or download is None:
            raise RuntimeError("skipped (DLCV_OFFLINE=1)" if folders["offline"] else "no download for this data")
        if hit := locate(Path(download(cache))):
            return found(hit, f"download ({hit})")
        raise DataLayoutError("finished, but the files are not in the expected layout")
    except Exception as err:  # no internet, DNS failure, timeout, checksum mismatch, disk full …
        tried.append(f"download into {cache}: {type(err).__name__}: {err}")
    tried, fixes = "\n  - ".join(tried), "".join(f"  {i}. {fix}\n" for i, fix in enumerate(fixes, 1))
    raise DataNotFoundError(f"Could not find the {name} data. Tried:\n  - {tried}\nFixes:\n{fixes}")


def sample_indices(n: int, k: int, seed: int, labels=None) -> np.ndarray:
    """Sorted indices of a seeded random sample of `k` of `n` items (never the first k); with `labels`,
    each class keeps its share (largest remainders), so a class-sorted folder still gives every class."""
    rng, k = np.random.default_rng(seed), min(int(k), n)
    classes, counts = np.unique(labels := np.zeros(n) if labels is None else np.asarray(labels), return_counts=True)
    quota = np.floor(counts * k / n).astype(int)
    quota[np.argsort(-(counts * k / n - quota), kind="stable")[: k - quota.sum()]] += 1
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), q, replace=False)
                                   for c, q in zip(classes, quota)]))


class ExerciseError(AssertionError): ...  # a check failed: the message says what is wrong and where to look


def expect(condition, exercise: str, failure: str, hint: str) -> None:
    if not condition:
        raise ExerciseError(f"✗ {exercise}: {failure}\n  Hint: {hint}")


def passed(exercise: str, what: str) -> None:
    print(f"✓ {exercise}: {what}")
