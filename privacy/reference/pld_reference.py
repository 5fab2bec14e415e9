"""Reference ε values from Google's dp_accounting PLD accountant, for
privacy/tests/dp_accounting.rs.

Regenerate with:
    python3 -m venv /tmp/dpa && /tmp/dpa/bin/pip install dp-accounting==0.6.0
    /tmp/dpa/bin/python privacy/reference/pld_reference.py 2>/dev/null > privacy/tests/data/pld_reference.json
"""
import itertools
import json

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant


def epsilon(q, z, steps, delta):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
    )
    # The default discretization (1e-4), as covey's PLD accountant uses.
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(event)
    return accountant.get_epsilon(delta)


rows = []
for q, z, steps, delta in itertools.product(
    [0.001, 0.01, 0.1, 0.5, 1.0],
    [0.8, 1.0, 2.0, 5.0],
    [1, 10, 100, 1000, 10000],
    [1e-5, 1e-7],
):
    # Many steps at a high rate reach ε in the hundreds, where nobody deploys,
    # and take minutes on large grids.
    if q * steps > 1000:
        continue
    eps = epsilon(q, z, steps, delta)
    if 0.01 <= eps <= 100:
        rows.append({"q": q, "z": z, "steps": steps, "delta": delta, "epsilon": eps})

# The published setting: Abadi et al. 2016, q = 0.01, σ = 4.
for steps in [10000, 40000]:
    rows.append(
        {"q": 0.01, "z": 4.0, "steps": steps, "delta": 1e-5, "epsilon": epsilon(0.01, 4.0, steps, 1e-5)}
    )

print(
    json.dumps(
        {
            "source": "dp_accounting 0.6.0 PLDAccountant(value_discretization_interval=1e-4), PoissonSampled(Gaussian)",
            "rows": rows,
        },
        indent=1,
    )
)
