"""The benchmark scripts (run each as a script: `python bench/bench_attention.py ...` in a checkout, or
`beit-fast bench attention ...` anywhere). Installed as `beit_fast.bench` so that an installed, non-editable
package carries them too; nothing here is meant to be imported."""
