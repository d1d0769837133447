"""Data stage: rows from files (or the hub) → token ids with labels, from `recipe.data`.

Data flows one way through its modules:

- `sources`: local files, folders and hub datasets, read row by row with each row's location;
- `formats`: which format rows are in (detected or checked), chat conversations and templates,
  and `scan`, which checks every row without a tokenizer;
- `splits`: what preparation produces, in memory or as flat token files;
- `encode`: `Encoder`, rows → token ids with labels (`IGNORE` = no loss);
- `packing`: several examples per row;
- `cache`: `prepare`, which fills the on-disk cache of prepared data and reads it back;
- `batching`: `collate` and the length-grouped training order.

Only light modules are imported here: numpy, torch and datasets load when first used.
"""

from peftcli.data.batching import LengthGroupedSampler, collate, padding_fraction, train_sampler
from peftcli.data.cache import cache_root, prepare
from peftcli.data.encode import IGNORE, Encoder, encode_rows, new_stats, prepare_file
from peftcli.data.formats import (
    CHAT_FORMATS,
    FORMAT_COLUMNS,
    chat_template,
    detect_format,
    label_names,
    scan,
)
from peftcli.data.packing import pack, pack_plan
from peftcli.data.sources import Source, hub_spec, is_hub_dataset, read_rows
from peftcli.data.splits import Prepared, Reference, Split, TokenArrays

__all__ = [
    "CHAT_FORMATS",
    "FORMAT_COLUMNS",
    "IGNORE",
    "Encoder",
    "LengthGroupedSampler",
    "Prepared",
    "Reference",
    "Source",
    "Split",
    "TokenArrays",
    "cache_root",
    "chat_template",
    "collate",
    "detect_format",
    "encode_rows",
    "hub_spec",
    "is_hub_dataset",
    "label_names",
    "new_stats",
    "pack",
    "pack_plan",
    "padding_fraction",
    "prepare",
    "prepare_file",
    "read_rows",
    "scan",
    "train_sampler",
]
