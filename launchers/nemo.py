"""NeMo-Run, imported once and quietly.

`import nemo_run` pulls in leptonai's deprecated v0 API, which emits DeprecationWarnings
that are neither ours nor actionable by users.
"""

from __future__ import annotations

import warnings


def nemo_run():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import nemo_run

    return nemo_run
