"""unsegment: the plumbing around the UAD attack of uad.py, one module per concern.

    unsegment.models     the SAM family's registry, checkpoints (downloads, strict loading)
    unsegment.images     image files: reading any PIL format, exact and atomic writes
    unsegment.progress   the status lines of both command lines
    unsegment.cost       the CPU time estimate of an attack
    unsegment.cli        uad.py's command line (the `unsegment` console script)
    unsegment.authors    the `authors` attack: the authors' target construction + UAD's stage 2
    unsegment.probes     eval.py's purification probes (JPEG, resize, blur, median, noise, bits)
    unsegment.report     pictures: eval.py --report's HTML page, uad.py --preview

The method itself, config to `protect`, is uad.py; the evaluation is eval.py.
"""

__version__ = "0.1.0"
