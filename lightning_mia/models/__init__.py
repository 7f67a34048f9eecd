"""Model families (diffusion, seq2seq), the image autoencoder and the attacker's encoder."""
