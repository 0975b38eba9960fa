"""Token reducers: how many visual tokens the model pays for. Importing this package registers them."""
