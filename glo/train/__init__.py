"""What `glo.train_vae` and `glo.train_inpaint` run: Lightning trainers for the models glo ships in
glo/standin."""
