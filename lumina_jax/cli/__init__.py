"""The commands: `lumina-sample`, `lumina-train` and `lumina-convert` once installed (each module's main()),
`python -m sample`, `python -m train` and `python -m convert` from the repository."""
