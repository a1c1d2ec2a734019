"""`fvg eval`: benchmark videos in the official evaluators' layouts, local metrics, imports, reports.

- `suites`: T2V-CompBench, VBench 2.0, MiniCompBench and plain prompt files, and their layouts.
- `generate`: every (prompt, mode, seed) video, resumable, sharded over processes with accelerate.
- `metrics`: CLIP similarity, anchor fidelity (PSNR/SSIM), temporal consistency, motion, MiniCompBench.
- `importers`: T2V-CompBench CSVs and VBench 2.0 result JSONs as score rows.
- `report`: mode x category tables, plots, paired comparisons with bootstrap intervals.
- `cli`: the `fvg eval` commands (also `python -m fvg.eval.cli`).

See docs/evaluation.md.
"""
