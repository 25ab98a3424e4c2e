"""Checkpoint files: safe loading, atomic saving, model and training checkpoints, RNG state, and a model's starting
weights.

A checkpoint is a plain dict of tensors and Python types, so every file loads with torch.load(weights_only=True):

    model_checkpoint(model, class_names)        what load_model and the README snippet read
    training_checkpoint(state, names, config)   + optimizer, schedule, EMA, scaler and RNG state: resumes exactly
    load_init(model, "starter")                 starting weights: random, ImageNet, the starter, or a file
    match_class_names(names, start_names)       which class outputs a fine-tuning copies from its start (by name)

This module sits below the network: it works on a model through its methods (load_detector_weights,
load_backbone_weights, load_imagenet_weights) and never imports model_lightweight (timm keeps its `_builder.py`
and `_helpers.py` apart from the networks in the same way).
"""
import copy
import json
import os
import random
import re
import tempfile

import numpy as np
import torch

from config import ConfigError, shipped_file


# ---- reading and writing files --------------------------------------------------------------------------------
def load_checkpoint_file(path, what="checkpoint"):
    """torch.load(path, weights_only=True), with any failure as one ValueError line.

    weights_only=True unpickles tensors and plain Python types only, so a file that would run code when
    unpickled (a class whose __reduce__ calls something) is refused before anything runs.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, a truncated zip's RuntimeError, EOFError, ...
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if code:
            raise ValueError(f"{what} {path} refused: it would run {code.group(1)} when unpickled, and only "
                             f"tensors and plain Python types are loaded (weights_only=True); use a checkpoint "
                             f"written by this toolkit") from None
        first = (str(error) or "?").splitlines()[0].split(". ")[0][:200]
        raise ValueError(f"{what} {path} is not a readable torch checkpoint ({type(error).__name__}: {first}); "
                         f"it may be truncated or corrupt: copy or write it again") from None


def read_backbone_state(path, checkpoint=None):
    """(backbone state dict, source model_config or None) from a backbone file, a full checkpoint or a
    plain state dict (`checkpoint`: the file's contents when already loaded)."""
    if checkpoint is None:
        checkpoint = load_checkpoint_file(path, "backbone file")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    config = checkpoint.get("model_config")
    if "backbone_state_dict" in checkpoint:
        return unwrap_state_dict(checkpoint["backbone_state_dict"]), config
    state = checkpoint.get("model_state_dict", checkpoint)
    state = unwrap_state_dict(state)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is neither a backbone file (backbone_state_dict) nor a checkpoint "
                         f"(model_state_dict); found keys {sorted(checkpoint)[:6]}")
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state, config


def unwrap_state_dict(state):
    """Strip DDP `module.` and torch.compile `_orig_mod.` prefixes."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def save_checkpoint(payload, path):
    """Write atomically: a temporary file in the same folder, then os.replace, so a crash leaves the old file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def model_checkpoint(model, class_names, **extra):
    """The plain-dict checkpoint that load_model and the README snippet read (`conf_thresholds`: the score
    threshold of each class that predict() defaults to, fine-tuning's calibrated ones; `conf_threshold`: one for all
    classes, which older readers take; `extra` may override both)."""
    thresholds = getattr(model, "conf_thresholds", None)
    return {"model_state_dict": unwrap_state_dict(model.state_dict()),
            "model_config": copy.deepcopy(model.model_config), "class_names": list(class_names),
            "conf_threshold": float(model.conf_threshold),
            "conf_thresholds": [float(t) for t in thresholds] if thresholds else None, **extra}


# ---- a model's starting weights ---------------------------------------------------------------------------------
INITS = ("random", "imagenet", "starter")  # or the path of a checkpoint or backbone file
CLASS_INITS = ("none", "by_name")  # fine-tuning's class_init: class outputs afresh, or copied by name
# Names that differ between Pascal VOC (and other sets) and COCO, whose names the starter knows. Names are compared
# after class_key: case, spaces, '_' and '-' do not count, so "dining table" is "diningtable" and "Potted_Plant"
# is "pottedplant" without an entry here.
CLASS_SYNONYMS = {"motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "tvmonitor": "tv"}
STARTER_PATH = shipped_file("weights", "lite0_coco_starter.pth")  # beside this file, or where pip installed it
STARTER_SIZE = "lite0"


def init_model_size(init):
    """The model size a starting point implies (a file's recorded size; lite0 for the starter), or None."""
    if init == "starter":
        return STARTER_SIZE
    if init in INITS or not init:
        return None
    _, config = read_backbone_state(init)
    return (config or {}).get("model_size")


def class_key(name):
    """A class name as match_class_names compares it: lower case, without spaces, '_' and '-', COCO's synonym."""
    key = "".join(str(name).lower().replace("_", " ").replace("-", " ").split())
    return CLASS_SYNONYMS.get(key, key)


def match_class_names(class_names, start_names):
    """Which class of the start each class is, by name (class_key: case-insensitive, '_' as ' ', COCO's synonyms).

    Returns:
        {index into class_names: index into start_names} for the classes found; the others are absent.
    """
    start = {}
    for index, name in enumerate(start_names):
        start.setdefault(class_key(name), index)
    return {index: start[class_key(name)] for index, name in enumerate(class_names) if class_key(name) in start}


def _class_rows(checkpoint, class_names):
    """({class index: start class index}, start class names) of a full checkpoint, for class-aware head init."""
    start_names = checkpoint.get("class_names") or []
    return match_class_names(class_names, start_names), list(start_names)


def describe_class_rows(class_names, rows, start_names):
    """'copied the class outputs of dog (dog), motorbike (motorcycle); new: kangaroo'."""
    copied = ", ".join(f"{class_names[i]} ({start_names[j]})" for i, j in sorted(rows.items()))
    new = ", ".join(name for i, name in enumerate(class_names) if i not in rows)
    return (f"copied the class output of {copied or 'no class'} from the start's classes"
            + (f"; new: {new}" if new else ""))


def load_init(model, init, backbone_only=False, class_names=None):
    """Set `model`'s starting weights; returns one line naming what was loaded.

    Args:
        init: "random"; "imagenet" (the backbone's ImageNet weights, lite0); "starter" (the lite0 detector
            pretrained ImageNet -> COCO classes that ships in weights/); or the path of a full checkpoint (every
            weight but the class output: load_detector_weights) or of a backbone file (the backbone only).
        backbone_only: load only the backbone of a file, even of a full checkpoint (create_lightweight_model's
            backbone_weights_path).
        class_names: the model's class names, for class-aware head init (fine-tuning's class_init "by_name"):
            a full checkpoint's class output rows of the classes it knows by name (match_class_names) are copied
            too; None copies none. A start without class names (random, ImageNet, a backbone file) copies none.
    The loaders record the groups they filled in `model.pretrained_groups`; the rest stay random.
    Raises:
        ValueError (one line) when the weights do not fit the model or do not exist.
    """
    nothing_copied = "; no class output copied (no class names in them)" if class_names is not None else ""
    if init == "random":
        return "random weights" + nothing_copied
    if init == "imagenet":
        model.load_imagenet_weights()
        return f"ImageNet weights ({model.model_size} backbone)" + nothing_copied
    if backbone_only and init != "starter":
        report = model.load_backbone_weights(init)
        return f"the backbone of {init}: {report['loaded']}/{report['total']} backbone tensors"
    path = STARTER_PATH if init == "starter" else init
    if init == "starter" and not os.path.isfile(path):
        raise ValueError(f"the starter detector {path} is missing; restore it with git, or start from "
                         f"--init imagenet")
    checkpoint = load_checkpoint_file(path, "init weights")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    source_size = (checkpoint.get("model_config") or {}).get("model_size")
    if source_size and source_size != model.model_size:
        raise ValueError(f"{path} holds a {source_size!r} backbone but model_size is {model.model_size!r}; "
                         f"pass --model-size {source_size}")
    if "model_state_dict" in checkpoint:
        rows, start_names = _class_rows(checkpoint, class_names) if class_names is not None else ({}, [])
        report = model.load_detector_weights(path, checkpoint, class_rows=rows)
        what = "the starter detector" if init == "starter" else "a full detector"
        line = f"{what} {path}: {report['loaded']}/{report['total']} tensors, all but the class output"
        if class_names is not None:
            line += f"; {describe_class_rows(class_names, rows, start_names)}" if start_names else nothing_copied
        return line
    report = model.load_backbone_weights(path, checkpoint=checkpoint)
    return f"a backbone file {path}: {report['loaded']}/{report['total']} backbone tensors" + nothing_copied


# ---- RNG state (exact resume) ------------------------------------------------------------------------------
def get_rng_state():
    """Python, NumPy and torch RNG states as tensors and plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"python": list(internal) + [version], "python_gauss": gauss, "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate((state["python"][-1], tuple(state["python"][:-1]), state["python_gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- checkpoints of a training run ---------------------------------------------------------------------------
def training_checkpoint(state, class_names, config, **metadata):
    """A resumable checkpoint (a plain dict; loads with weights_only=True) of an engine.TrainState.

    `model_state_dict` holds the weights to use for inference (the EMA when there is one), so load_model and
    the README snippet get the evaluated model; `train_state_dict` holds the raw weights the optimizer steps,
    and `ema_updates` the EMA's step count.
    """
    inference = state.ema.module if state.ema is not None else state.model
    checkpoint = model_checkpoint(inference, class_names, config=json_safe(config), **metadata)
    checkpoint["model_config"] = dict(state.model.model_config)
    checkpoint["train_state_dict"] = unwrap_state_dict(state.model.state_dict())
    checkpoint["ema_updates"] = int(state.ema.n_averaged) if state.ema is not None else 0
    for key, part in (("optimizer_state_dict", state.optimizer), ("scheduler_state_dict", state.scheduler),
                      ("scaler_state_dict", state.scaler)):
        if part is not None:
            checkpoint[key] = part.state_dict()
    checkpoint["rng_state"] = get_rng_state()
    return checkpoint


def json_safe(config):
    """The config as plain JSON types (paths and other objects as strings)."""
    return json.loads(json.dumps(config, default=str))


def load_training_checkpoint(path):
    """Read a resumable checkpoint (weights_only=True) and check it is one."""
    try:
        checkpoint = load_checkpoint_file(path, "--resume checkpoint")
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error)) from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"{path} holds a {type(checkpoint).__name__}, not a training checkpoint")
    missing = [k for k in ("train_state_dict", "optimizer_state_dict", "config", "epoch") if k not in checkpoint]
    if missing:
        raise ConfigError(f"{path} cannot be resumed (it lacks {', '.join(missing)}); to start a new run from "
                          f"its weights, pass it as pretrained weights instead of --resume")
    return checkpoint


def restore_training_state(checkpoint, state, optimizer=True):
    """Weights, EMA, scaler and RNG from `checkpoint`; the optimizer and schedule too unless `optimizer` is
    False (a fine-tuning resumed at a stage boundary starts that stage's optimizer afresh)."""
    state.model.load_state_dict(unwrap_state_dict(checkpoint["train_state_dict"]))
    if state.ema is not None:
        state.ema.module.load_state_dict(unwrap_state_dict(checkpoint["model_state_dict"]))
        state.ema.n_averaged.fill_(checkpoint.get("ema_updates", 0))
    parts = [("scaler_state_dict", state.scaler)]
    if optimizer:
        parts += [("optimizer_state_dict", state.optimizer), ("scheduler_state_dict", state.scheduler)]
    for key, part in parts:
        if part is not None and key in checkpoint:
            part.load_state_dict(checkpoint[key])
    if "rng_state" in checkpoint:
        set_rng_state(checkpoint["rng_state"])
