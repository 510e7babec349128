"""hungry-numpy: a Flower app whose training needs a set amount of memory."""
