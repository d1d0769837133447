"""PEFT methods, one module per job:

- `table`: the `Method` rows — everything peftcli knows about each `peft.method` (light: the
  recipe schema, `validate` and `methods` read it);
- `options`: `peft.options` checked against the config class's source (part of the schema);
- `apply`: refusals before weights load (`check_fit`), config keywords, `apply_method`;
- `saved`: the adapter a recipe's `init_from` names, read as JSON (its folder, config, settings);
- `load`: `load_adapter`, the one way peftcli loads a saved adapter;
- `hooks`: the per-method functions the rows name; `targets`: target-module resolution;
  `tuners`: methods peftcli adds to PEFT; `reference`: the shares `peftcli methods` shows.

Import the heavy functions from their module; only the table is re-exported here.
"""

from peftcli.methods.table import METHODS, Method, canonical_method, method_of

__all__ = ["METHODS", "Method", "canonical_method", "method_of"]
