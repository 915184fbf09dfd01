"""Backend-specific kernels, opt-in through `config.model.conv_impl`; the models' plain path needs none of them."""
