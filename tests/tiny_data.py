"""The data arguments of the tests' tiny one-shadow experiments: 300 shapes, a 16-sample target
pool (8 members, 8 non-members), shadows of the same size from a 160-sample auxiliary pool, and a
100-sample public pool for the autoencoder and the attacker's encoder."""

DATA = [
    "--data.source.num_samples=300",
    "--data.target_size=16",
    "--data.aux_size=160",
    "--data.shadow_size=16",
    "--data.public_size=100",
    "--data.member_fraction=0.5",
    "--data.num_shadows=1",
    "--data.batch_size=8",
]
