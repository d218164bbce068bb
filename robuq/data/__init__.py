"""Data: Fashion-MNIST (fmnist), VAE latent shards (prepare, latents), the resumable order (loader)."""
