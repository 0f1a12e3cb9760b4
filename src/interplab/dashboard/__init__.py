"""Feature dashboards in the browser.

- configs.py: the commands' configs (`DashboardConfig`, `ServeConfig`, `NeuronpediaConfig`), standard library only.
- data.py, stats.py, assemble.py: the one streaming pass over a corpus that computes every
  latent's statistics (frequency, histogram, top and quantile-bin examples, logit effects, correlated latents and
  neurons); store.py: the site's data files (JavaScript wrappers around JSON, so file:// pages can load them) and
  their Python readers.
- site.py, assets/: `interplab dashboard build`, the static pages (plain JS, corpus text always inserted as text).
- serve.py: `interplab dashboard serve` (loopback by default, no path traversal).
- neuronpedia.py: export to Neuronpedia's import layout or SAEDashboard's batches.
"""
