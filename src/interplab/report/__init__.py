"""Pages from saved results: the Markdown report of an SAE evaluation run, and `interplab report runs`, a
report.html per run folder (config, metrics, figures) and an index linking them.

This is a top room: it reads what every method wrote, and no method imports it.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "configs": ["ParetoConfig", "RunReportConfig"],
        "eval_report": ["write_eval_report"],
        "run_reports": ["write_run_reports"],
    },
)
