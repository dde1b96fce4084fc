"""Training a capacitor: one optimisation `step`, the `run` loop with its settings and defaults, the batch `data`
streams, and resumable `checkpoint`s."""
