"""`fvg eval`: benchmark videos in the official evaluators' layouts, local metrics, imports, reports.

- `suites`: T2V-CompBench, VBench 2.0, MiniCompBench and plain prompt files, and their layouts.
- `generate`: every (prompt, mode, seed) video, resumable, sharded over processes with accelerate.
- `metrics`: CLIP similarity, anchor fidelity (PSNR/SSIM), temporal consistency, motion, MiniCompBench.
- `check`: refuses a folder the official evaluators would mis-pair; writes their exact commands.
- `importers`: the official scripts' own outputs (T2V-CompBench CSVs, VBench 2.0 JSONs) as score rows.
- `report`: mode x category tables, plots, paired comparisons with bootstrap intervals.
- `cli`: the `fvg eval` commands (also `python -m fvg.eval.cli`).

See docs/evaluation.md.
"""
