"""polysense.datasets: generators that write datasets as files plus a manifest, for training and benchmarks.

    builtin    the built-in tri-modal set (drawn shapes, sentences, tone sweeps), deterministic for a seed
    avdigits   FSDD spoken digits paired with sign-digit photos (a manifest over files kept where they are)

They are not part of inference: `import polysense` never imports this package. Import the module you need,
e.g. `from polysense.datasets.builtin import BuiltinSpec, write_builtin`.
"""
