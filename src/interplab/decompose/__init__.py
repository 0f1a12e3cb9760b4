"""Parameter decomposition: a model's weights as sums of rank-1 subcomponents, checked where the truth is known.

    from interplab.decompose.toys import TOYS
    from interplab.decompose.truth import ToyRequest
    from interplab.decompose.configs import DecomposeConfig
    from interplab.decompose.presets import resolve
    from interplab.decompose.spd import run_spd
    from interplab.decompose.evaluate import score
    truth = TOYS["tms-5-2"](ToyRequest(seed=0, cache=None, device="cpu", progress=True))
    decomposition = run_spd(truth, resolve(DecomposeConfig(toy="tms-5-2"), "tms-5-2"), seed=0)
    print(score(decomposition, truth)["layers"]["linear1"]["mmcs"])

- truth.py: the GroundTruthModel protocol (a trained model, targets, inputs, true mechanisms); toys.py: the registry
  of built-in ones (tms_models.py: TMS 5-2, 40-10, +ID; resid_mlp.py, animals_model.py).
- components.py: rank-1 subcomponents of nn.Linear / nn.Embedding weights and the masked forward (hooks).
- importance.py: causal-importance MLPs and leaky hard sigmoids; spd.py: SPD's losses and training;
  apd.py: APD (gradient attributions, batch top-k, Schatten-p simplicity); loop.py: the shared resumable loop.
- scores.py, evaluate.py: MMCS, ML2R, live counts, importance matrices, kept/ablated losses, random-basis control;
  run.py: `interplab decompose` (with the random-model control), report.py, figures.py; presets.py: settings.
"""
