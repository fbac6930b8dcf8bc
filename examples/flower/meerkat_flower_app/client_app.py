"""The `ClientApp`: local zeroth-order steps on the site's private data; uplink = T scalars.

The site's Meerkat client id and data come from the SuperNode's node config
(`--node-config "client-id=0 data-files=/data/train.csv"`); in simulation, from Flower's
`partition-id` and the configured task's partition.
"""

from pathlib import Path

from meerkat_hf.federated.flower import build_client_app

app = build_client_app(app_dir=Path(__file__).resolve().parent.parent)
