"""Configuration of the training scripts: where each setting comes from, what makes it valid, how a command ends.

- **One source of defaults**: config_transfer_learning.json holds every default, each once: a section per
  training script ("pretraining", "finetuning") over "shared" and "optimization", which both read, and
  "inference", which detection falls back on (`inference_defaults`). Flags have no defaults of their own;
  their help texts quote the file's. A missing or broken file is a one-line error.
- **Precedence**: the file's defaults < a --config file (a copy of the file, with sections, or a flat dict of
  the same keys; renamed keys are read under their new names, with a warning) < the flags typed on the command
  line. On --resume the run's own config takes the place of the first two, and settings that fix the
  architecture cannot change.
- **Checks** fail in one line that says what is wrong and how to fix it (ConfigError); `run_cli`, the
  command-line entry of every script, turns that into exit status 2, a run stopped by its losses into 1 and
  Ctrl-C into 130, never a traceback.
"""
import argparse
import difflib
import json
import logging
import math
import numbers
import os
import sys
import sysconfig

import torch

import distributed
from annotations import read_yaml_entry

logger = logging.getLogger(__name__)

# Where `pip install .` puts the files that ship with the modules (pyproject.toml's data-files).
DATA_FOLDER = os.path.join("share", "lightweight-detector-transfer")


def shipped_file(*parts):
    """A file that ships with the toolkit (the default config, the starter detector), by its path in the checkout.

    Beside the modules in a checkout or an editable install. `pip install .` puts the modules in site-packages
    and the files in DATA_FOLDER under the install's prefix (the venv, ~/.local, --prefix), or under the folder
    itself with --target. A file found nowhere gets its checkout path, which the caller's error names."""
    here = os.path.dirname(os.path.abspath(__file__))
    prefix = os.path.join(here, os.path.relpath(sysconfig.get_path("data"), sysconfig.get_path("purelib")))
    for root in (here, os.path.join(prefix, DATA_FOLDER), os.path.join(here, DATA_FOLDER)):
        path = os.path.normpath(os.path.join(root, *parts))
        if os.path.exists(path):
            return path
    return os.path.join(here, *parts)


DEFAULT_CONFIG_PATH = shipped_file("config_transfer_learning.json")
AMP_DTYPES = ("bf16", "fp16")
LR_SCALINGS = ("linear", "sqrt", "none")
# Keys of an invocation rather than of a run: never in the file's sections, never taken from a resumed run.
RUNTIME_DEFAULTS = {"config": None, "resume": None, "device": None, "progress": True, "plots": True, "name": None}
# The sections every training script reads under its own, the later over the earlier.
COMMON_SECTIONS = ("shared", "optimization")
# Old key -> new key. A --config file or keyword argument with an old key warns and is used under the new name;
# a resumed run's saved config is renamed silently (it is the run's own record, not a user's input).
RENAMED_KEYS = {"conf_threshold": "report_threshold", "print_freq": "log_interval"}
INFERENCE_KEYS = ("conf_threshold", "iou_threshold", "max_detections")


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message says what and how to fix it."""


class TrainingFailed(RuntimeError):
    """A run that stopped on its own (e.g. non-finite losses); the message says what was kept."""


# What the training scripts report as bad input (one line, exit 2): their data loaders raise the last two.
TRAINING_INPUT_ERRORS = (ConfigError, FileNotFoundError, ValueError)


# ---- JSON files ---------------------------------------------------------------------------------------
def load_json(path, what="config file"):
    if not os.path.isfile(path):
        raise ConfigError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{what} {path} is not valid JSON: {error}") from None


def json_ready(value):
    """`value` with NaN and infinities as None (JSON null) and numpy scalars as Python numbers, recursively.

    JSON has no NaN: `json.dump` writes a bare `NaN` that strict parsers (JavaScript's JSON.parse) refuse, and
    undefined metrics (COCOeval's AP of an empty size range) are common (issue #24).
    """
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return value


def write_json_atomic(data, path, indent=2):
    """Write strict JSON (`json_ready`: no NaN) through a temporary file and os.replace, so a crash never leaves
    half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(json_ready(data), f, indent=indent, default=str, allow_nan=False)
    os.replace(tmp, path)


# ---- resolution -----------------------------------------------------------------------------------------
def config_sections(data, section):
    """The flat settings of a config dict: "shared" < "optimization" < `section` if the file has sections (a copy
    of config_transfer_learning.json, or of an older one without "shared"), else the dict itself (the flat
    format). Keys starting with '_' are notes."""
    if section in data or any(common in data for common in COMMON_SECTIONS):
        flat = {key: value for part in (*COMMON_SECTIONS, section) for key, value in data.get(part, {}).items()}
    else:
        flat = dict(data)
    return {k: v for k, v in flat.items() if not k.startswith("_")}


def _shipped_section(data, section, path):
    if not isinstance(data.get(section), dict):
        raise ConfigError(f"default config {path} has no {section!r} section; restore the file from the repository")
    return data[section]


def script_defaults(section, path=None):
    """Every valid key of a script with its default: the file's (DEFAULT_CONFIG_PATH for None) "shared",
    "optimization" and `section`, then the invocation keys (RUNTIME_DEFAULTS)."""
    path = path or DEFAULT_CONFIG_PATH
    data = load_json(path, "default config")
    _shipped_section(data, section, path)
    return {**config_sections(data, section), **RUNTIME_DEFAULTS}


def inference_defaults(path=None):
    """What detection falls back on when its caller passes None, read from the shipped file (DEFAULT_CONFIG_PATH
    for None) at each call: no module-level state, so an edited file counts at once.

    Returns:
        dict with the "inference" section's "conf_threshold" (the score cut-off of a model without a calibrated
        threshold), "iou_threshold" (class-aware NMS) and "max_detections" (per image), and "shared"'s
        "report_threshold" (the score at which evaluate() reports precision, recall and F1, as training does).
    """
    path = path or DEFAULT_CONFIG_PATH
    data = load_json(path, "default config")
    values = {key: _shipped_section(data, "inference", path).get(key) for key in INFERENCE_KEYS}
    values["report_threshold"] = _shipped_section(data, "shared", path).get("report_threshold")
    missing = [key for key, value in values.items() if value is None]
    if missing:
        raise ConfigError(f"default config {path} has no {missing[0]}; restore the file from the repository")
    return values


def renamed(values, source=None):
    """`values` with the old names of RENAMED_KEYS under their new ones; a one-line warning naming `source` for
    each (none for source None). An old and a new name together are an error: which one was meant is unclear."""
    values = dict(values)
    for old, new in RENAMED_KEYS.items():
        if old not in values:
            continue
        if new in values:
            raise ConfigError(f"{source or 'the config'} sets both {old!r} and {new!r}, its new name; keep {new!r}")
        if source is not None:
            logger.warning("%s: config key %r is now %r and is read as that; rename it", source, old, new)
        values[new] = values.pop(old)
    return values


def check_types(values, reference, source):
    """Refuse unknown keys (naming the nearest valid one) and values of the wrong type."""
    for key, value in values.items():
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(reference))}"
            raise ConfigError(f"unknown config key {key!r} in {source}; {hint}")
        expected = reference[key]
        if expected is None or value is None:
            continue
        if isinstance(expected, bool) or isinstance(value, bool):
            ok = isinstance(value, bool) == isinstance(expected, bool)
        elif isinstance(expected, (int, float)):
            ok = isinstance(value, (int, float)) and (isinstance(expected, float) or float(value).is_integer())
        else:
            # a list (of class names) may also come as "a,b,c" or as a count K
            ok = isinstance(value, type(expected)) or (isinstance(expected, list) and isinstance(value, (str, int)))
        if not ok:
            raise ConfigError(f"config key {key!r} in {source} should be a {type(expected).__name__}, got {value!r}")


def file_values(path, section, defaults):
    """A --config file's settings for `section`, checked against `defaults`."""
    values = renamed(config_sections(load_json(path), section), path)
    check_types(values, defaults, path)
    return values


def resolve(section, typed):
    """A script's settings: config_transfer_learning.json's `section` < --config < `typed` (flags or keyword
    arguments). runs.resume puts a resumed run's own settings in the place of the first two.

    Returns:
        (config, the keys given explicitly by --config or `typed`).
    """
    defaults = script_defaults(section)
    typed = renamed(typed, "the arguments")
    check_types({k: v for k, v in typed.items() if k != "config"}, defaults, "the arguments")
    from_file = file_values(typed["config"], section, defaults) if typed.get("config") else {}
    explicit = {**from_file, **typed}
    return {**defaults, **explicit}, explicit


def resumed(config, saved, overrides, fixed_keys, path):
    """The config of a resumed run: its saved settings, then --config file values and typed flags (`overrides`).

    Keys in `fixed_keys` shape the model or its classes and cannot change; invocation keys always come from
    this invocation.
    """
    saved = {key: value for key, value in renamed(saved).items() if key not in RUNTIME_DEFAULTS}
    for key in fixed_keys:
        if key in overrides and _comparable(overrides[key]) != _comparable(saved.get(key)):
            raise ConfigError(f"{key} cannot change on --resume: the run has {saved.get(key)!r}, got {overrides[key]!r}"
                              f"; start a new run for another {key}")
    return {**config, **saved, **overrides}


def _comparable(value):
    """A fixed key's value as compared on --resume: a name, "a,b" and ["a", "b"] alike, case-insensitive."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    return [str(v).lower() for v in value] if isinstance(value, (list, tuple)) else value


# ---- checks shared by both scripts ------------------------------------------------------------------------
def check_common(config, stride):
    """The facts both scripts need before anything trains, each a one-line error."""
    if config["batch_size"] < 1:
        raise ConfigError(f"batch_size must be >= 1, got {config['batch_size']}")
    if config["img_size"] < stride or config["img_size"] % stride:
        raise ConfigError(f"img_size {config['img_size']} is not a positive multiple of {stride}; "
                          f"use {stride * max(1, round(config['img_size'] / stride))}")
    for key, value in config.items():
        if key.endswith("_lr") and not value >= 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    for key in ("max_nonfinite_steps", "log_interval"):
        if config[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {config[key]}")
    if not 0 <= config["report_threshold"] <= 1:
        raise ConfigError(f"report_threshold must be a score in [0, 1], got {config['report_threshold']}")
    if config["eval_interval"] < 1 or (config["save_interval"] is not None and config["save_interval"] < 1):
        raise ConfigError(f"eval_interval must be >= 1 and save_interval >= 1 or null, got {config['eval_interval']} "
                          f"and {config['save_interval']}")
    if config["patience"] is not None and config["patience"] < 1:
        raise ConfigError(f"patience must be >= 1 (or null: never stop early), got {config['patience']}")
    if not 0 <= config["max_bad_image_fraction"] <= 1:
        raise ConfigError(f"max_bad_image_fraction must be in [0, 1], got {config['max_bad_image_fraction']}")
    if config["weight_decay"] < 0 or not 0 < config["warmup_start_factor"] <= 1:
        raise ConfigError("weight_decay must be >= 0 and warmup_start_factor in (0, 1]")
    if config["lr_scaling"] not in LR_SCALINGS:
        raise ConfigError(f"lr_scaling must be one of {', '.join(LR_SCALINGS)}, got {config['lr_scaling']!r}")
    reference = config["lr_reference_batch_size"]
    if reference is not None and (not isinstance(reference, int) or isinstance(reference, bool) or reference < 1):
        raise ConfigError(f"lr_reference_batch_size must be a positive integer or null, got {reference!r}")
    check_device(config)


def check_device(config):
    device = config["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if config["sync_bn"] and not on_cuda:
        raise ConfigError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); drop it on the CPU")
    amp_dtype = config["amp_dtype"]
    if amp_dtype is not None and amp_dtype not in AMP_DTYPES:
        raise ConfigError(f"amp_dtype must be one of {list(AMP_DTYPES)}, got {amp_dtype!r}")
    if amp_dtype == "fp16" and not on_cuda:
        raise ConfigError("--amp-dtype fp16 needs CUDA; on the CPU use bf16 (the default there)")
    if amp_dtype == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bfloat16 support; use --amp-dtype fp16")


def add_data_flags(parser, defaults):
    """The data flags of both scripts: annotations in any format (annotations.py) and an optional validation set."""
    parser.add_argument("--train-ann", help="training annotations: a COCO JSON, a Pascal VOC folder (XML), a YOLO "
                                            "data.yaml or labels folder")
    parser.add_argument("--train-root", help="training images folder (COCO JSON; VOC and YOLO find theirs)")
    parser.add_argument("--val-ann", help="validation annotations, any format (none: --val-fraction of the "
                                          "training images, or a data.yaml's val)")
    parser.add_argument("--val-root", help="validation images folder")
    parser.add_argument("--val-fraction", type=float, help=help_default(
        defaults, "val_fraction", "without a validation set: the share of training images held out, chosen by a "
                                  "hash of their paths (the run's split.json)"))


def check_data(config, explicit):
    """Annotations that exist, a validation fraction in (0, 1), and not both a validation set and a fraction
    (a data.yaml's val entry wins over --val-fraction, with a warning)."""
    check_path(config, "train_ann")
    for key in ("train_root", "val_ann", "val_root"):
        if config[key]:
            check_path(config, key)
    if config["val_root"] and not config["val_ann"]:
        raise ConfigError("val_root is set but val_ann is not: pass --val-ann with it, or neither (then --val-fraction "
                          "of the training images validates)")
    if not 0 < config["val_fraction"] < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {config['val_fraction']}")
    if config["val_ann"] and "val_fraction" in explicit:
        raise ConfigError("both a validation set (--val-ann) and --val-fraction were given; pass one of them")
    if not config["val_ann"] and "val_fraction" in explicit and data_yaml_val(config["train_ann"]):
        logger.warning("%s has a val entry: its images validate, and --val-fraction %s is ignored",
                       config["train_ann"], config["val_fraction"])


def data_yaml_val(path):
    """The val entry of a YOLO data.yaml (None for other annotations), which takes the place of --val-fraction."""
    if not (os.path.isfile(path) and str(path).lower().endswith((".yaml", ".yml"))):
        return None
    try:
        return read_yaml_entry(path, "val")
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_path(config, key, kind="any"):
    """A set path that exists ("file", "dir" or "any"), as a one-line error naming the key's flag."""
    path = config[key]
    if not path:
        raise ConfigError(f"{key} is not set: pass --{key.replace('_', '-')} or put it in --config")
    exists = {"file": os.path.isfile, "dir": os.path.isdir, "any": os.path.exists}[kind]
    if not exists(path):
        raise ConfigError(f"{key} does not exist: {path}")


# ---- the command-line entry -------------------------------------------------------------------------------
def run_cli(main, argv=None, bad_input=(ConfigError,)):
    """Call a command's main(argv) with the exit-code policy of every script: bad input (`bad_input`) is one
    line on stderr and exit status 2, a run that stopped on its own (TrainingFailed) exit 1, Ctrl-C exit 130
    (128 + SIGINT, the shell's convention) with the message that says how to resume; never a traceback."""
    try:
        return main(argv)
    except bad_input as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingFailed as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as error:
        print(str(error) or "interrupted before training started; nothing saved", file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.cleanup()


def help_default(defaults, key, text):
    """A flag's help with its effective default from config_transfer_learning.json."""
    value = defaults.get(key)
    shown = "none" if value is None else ",".join(map(str, value)) if isinstance(value, list) else value
    return f"{text} (default: {shown})"


class _InitFlag(argparse.Action):
    """--init and its older spellings set one key; two that disagree are an error, not a silent last wins."""

    def __call__(self, parser, namespace, values, option_string=None):
        value = self.const if self.nargs == 0 else values
        previous = getattr(namespace, "init", None)
        if previous is not None and previous != value:
            parser.error(f"{option_string} {value if self.nargs != 0 else ''}".strip() + f" contradicts an earlier "
                         f"starting-weights flag ({previous}); pass one of --init, --pretrained-backbone, "
                         f"--no-pretrained")
        namespace.init = value


def add_init_flags(parser, help_text):
    """--init (starter | imagenet | random | PATH), with the seed's spellings --pretrained-backbone PATH and
    --no-pretrained / --no-imagenet (random weights)."""
    parser.add_argument("--init", action=_InitFlag, help=help_text)
    parser.add_argument("--pretrained-backbone", action=_InitFlag, metavar="PATH", help="the same as --init PATH")
    parser.add_argument("--no-pretrained", action=_InitFlag, nargs=0, const="random",
                        help="the same as --init random (the baseline)")
    parser.add_argument("--no-imagenet", action=_InitFlag, nargs=0, const="random", help="the same as --init random")


def add_run_flags(parser, defaults):
    """Flags of the run rather than of the recipe, the same in both training scripts."""
    def default(key, text):
        return help_default(defaults, key, text)
    parser.add_argument("--workers", type=int, help=default("workers", "DataLoader workers (none: per CPU count)"))
    parser.add_argument("--output-dir", help=default("output_dir", "where run folders are created"))
    parser.add_argument("--name", help="the run folder's name under --output-dir (default: a name and the start "
                                       "time); a folder that already holds a run is refused, never overwritten")
    parser.add_argument("--resume", help="a run folder, or its last checkpoint: continue that run exactly")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--seed", type=int, help=default("seed", "seed of weights, data order and augmentation"))
    parser.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 + GradScaler on CUDA)")
    parser.add_argument("--amp-dtype", choices=AMP_DTYPES, help="autocast dtype with --amp")
    parser.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs under torchrun (CUDA only)")
    parser.add_argument("--log-interval", type=int, help=default("log_interval", "TensorBoard scalars every N "
                                                                                 "steps"))
    parser.add_argument("--print-freq", dest="log_interval", type=int, help=argparse.SUPPRESS)  # its old name
    parser.add_argument("--report-threshold", type=float, help=default(
        "report_threshold", "the score at which the epoch lines and metrics.csv give precision, recall and F1"))
    parser.add_argument("--eval-interval", type=int, help=default("eval_interval", "evaluate every N epochs and at "
                                                                                   "the last"))
    parser.add_argument("--save-interval", type=int, help=default("save_interval", "keep snapshots/epoch_<N>.pth "
                                                                                   "every N epochs (none: never)"))
    parser.add_argument("--patience", type=int, help=default("patience", "stop when val mAP has not improved for N "
                                                                         "epochs"))
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    parser.add_argument("--no-plots", dest="plots", action="store_false",
                        help="no results.png, val_predictions.jpg or TensorBoard images (the numbers are unchanged)")


def command_line(argv, resolve_config, train):
    """A training script's main(argv): its output on stderr, `resolve_config(argv) -> (config, checkpoint)`, then
    `train(config, checkpoint, argv)`; returns what train returns."""
    script_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    config, checkpoint = resolve_config(argv)
    return train(config, checkpoint, argv)


def script_logging():
    """A script's command-line output: INFO lines on stderr from rank 0, warnings from the others. Only main()
    calls it; the Python API leaves logging as its caller configured it."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", force=True)


def argument_parser(doc):
    """The scripts' parser: only typed flags come back (argparse.SUPPRESS), so that they override the file."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   argument_default=argparse.SUPPRESS)
