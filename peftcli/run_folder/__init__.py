"""The run folder: its layout, where a `train` may write, who writes it, and what a run leaves.

Three rules keep a user's files safe:
- peftcli deletes only what it made. A folder it creates gets a marker file; `--overwrite`
  replaces only a peftcli run (finished, unfinished or stranded), never another folder, the
  working directory, or a folder that holds the recipe's own files.
- One writer per run. `train` holds a lock beside the run folder for its whole life; a second
  `train` of the same folder is refused naming the first.
- Interrupted means resumable. An unfinished run (`.incomplete` inside) — fresh, resumed, or an
  `--overwrite` run still building in its hidden `.NAME.partial` twin — continues with
  `--resume`; an overwriting run's checkpoints are never thrown away without being asked.

- `layout`: every path of a run folder (the only place a run file's name is spelled), what a
  folder is (a run, unfinished, with checkpoints), checkpoint listing;
- `plan`: the protected paths, the plan (fresh, resumed, overwriting), the resume point;
- `lock`: `RunLock`, one writer per run;
- `lifecycle`: create, open, forget, finish, and metrics.jsonl trimmed to a resumed step;
- `save`: the adapter, eval.json, later results.
Opening a run, adapter or model for `eval`/`generate`/`merge` is `peftcli.target`'s.
"""
