"""Reference ε values from Google's dp_accounting, for privacy/tests/dp_accounting.rs.

Regenerate with:
    python3 -m venv /tmp/dpa && /tmp/dpa/bin/pip install dp-accounting==0.6.0
    /tmp/dpa/bin/python privacy/reference/rdp_reference.py 2>/dev/null > privacy/tests/data/rdp_reference.json
"""
import itertools
import math
import json

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant


# The same orders as covey_privacy::accountant::RdpAccountant, so the two
# compute the same quantity: RDP at each order, then the best conversion.
ORDERS = (
    [i / 100 for i in range(101, 1201)]
    + list(range(13, 257))
    + [320, 384, 448, 512]
)


def epsilon(q, z, steps, delta):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
    )
    accountant = rdp_privacy_accountant.RdpAccountant(orders=ORDERS)
    accountant.compose(event)
    return accountant.get_epsilon(delta)


def converges(q, z):
    """dp_accounting drops an order whose series does not settle (it warns);
    such a row would compare different sets of orders, so it is left out."""
    rdp = rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(q, z, ORDERS)
    return all(math.isfinite(r) for r in rdp)


rows = []
for q, z, steps, delta in itertools.product(
    [0.001, 0.01, 0.05, 0.1, 0.5, 1.0],
    [0.8, 1.0, 2.0, 5.0],
    [1, 10, 100, 1000, 10000],
    [1e-5, 1e-7],
):
    if not converges(q, z):
        continue
    eps = epsilon(q, z, steps, delta)
    # Outside the range anyone would deploy, both accountants' grids of
    # orders decide the answer rather than the mechanism.
    if 0.01 <= eps <= 100:
        rows.append({"q": q, "z": z, "steps": steps, "delta": delta, "epsilon": eps})

print(
    json.dumps(
        {
            "source": "dp_accounting 0.6.0 RdpAccountant(orders=covey's), PoissonSampled(Gaussian)",
            "rows": rows,
        },
        indent=1,
    )
)
