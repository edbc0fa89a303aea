"""psirl.verify: the exact-enumeration harness behind `psirl gradcheck` and the core tests.

- ``tabular``: a tabular autoregressive policy (V tokens, horizon H, P prompts, optional EOS)
  small enough to enumerate every sequence;
- ``exact``: J(theta) = E[R] - beta KL(pi || pi_ref), its gradient and the value function, by
  summing over every sequence (float64, autograd);
- ``sampled``: the online step's sampled gradient (core advantages, KL, policy_loss) for any
  knob setting, averaged over thousands of batches and tested against the exact gradient;
- ``stats``: Hotelling's T^2 test and the F distribution;
- ``gradcheck``: every preset x KL placement, the 001 KL table, the 000 variance ordering.

See DESIGN.md, "Correctness is shown, not assumed".
"""

from psirl.verify.exact import TabularProblem, exact_gradient, exact_objective, make_problem
from psirl.verify.tabular import TabularPolicy

__all__ = ["TabularPolicy", "TabularProblem", "make_problem", "exact_objective", "exact_gradient"]
