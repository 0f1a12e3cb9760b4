"""Belief-state geometry (Shai et al. 2024): hidden Markov processes, the beliefs an observer holds about their
hidden state, and the mixed-state presentation those beliefs form.

    from interplab.beliefs import make_process, sample, belief_states, mixed_state_presentation
    proc = make_process("mess3:x=0.05,a=0.85")
    tokens = sample(proc, n_sequences=1024, length=10, seed=0)       # [1024, 10] int64
    targets = belief_states(proc, tokens)                            # [1024, 10, 3]: η after tokens 0..j
    msp = mixed_state_presentation(make_process("rrxor"), depth=7)   # 36 beliefs (all by depth 6), closed

- process.py: `Process` (T[x, s, s'] validated), built-ins (Mess3, RRXOR, Z1R, Even, Golden Mean), files and
  specs (`make_process`), the stationary distribution, vectorised seeded sampling.
- configs.py: the commands' configs (standard library only).
- train.py: `interplab beliefs train`, a toy transformer trained on a process (through `interplab.toy.loop`), with
  its loss against h(L).
- regress.py: `interplab beliefs regress`, affine maps from activations onto the beliefs, with CV and shuffles, the
  same fit onto the Bayes-optimal next-token probabilities, and belief patching at the last checkpoint.
- patch.py: belief patching (Shai et al.): the belief subspace of one sequence moved into another, with the KLs to
  both Bayes-optimal predictions, beside a random-subspace control.
- describe.py: `interplab beliefs msp`, a process described exactly (entropies, MSP, spectrum, belief simplex).
- msp.py: the belief tree and the mixed-state presentation, its spectrum, beliefs for given sequences, every
  sequence of a length with its probability, exact myopic entropies h(L) and the entropy rate with bounds.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "configs": ["BeliefRegressConfig", "BeliefTrainConfig", "MSPConfig"],
        "describe": ["describe_process"],
        "msp": ["AllSequences", "EntropyRate", "MSPTree", "MixedStatePresentation", "all_sequences", "belief_states",
                "entropy_rate", "mixed_state_presentation", "msp_tree", "myopic_entropy", "spectrum"],
        "process": ["PROCESSES", "Process", "ProcessSample", "even_process", "golden_mean", "load_process",
                    "make_process", "mess3", "next_token_probabilities", "rrxor", "sample", "sample_with_states",
                    "stationary_distribution", "token_distribution", "validate_transitions", "z1r"],
        "patch": ["AffineMap", "BeliefPatch", "belief_patch", "belief_subspace", "fit_affine", "random_subspace"],
        "regress": ["next_token_control", "run_regress"],
        "train": ["train_beliefs"],
    },
)
