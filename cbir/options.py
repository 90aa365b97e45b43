"""The names users choose from on the command line, kept free of heavy imports so that
``--help`` is instant; the modules that implement them import them from here."""

INDEX_KINDS = ("flat", "ivf", "ivfpq", "hnsw")
MEASURES = ("all", "weighted", "random", "stat", "separated", "remove", "loo", "incremental", "removal",
            "interpolate")
VOTES = ("majority", "distance", "softmax")
LOSSES = ("margin", "proxy_nca", "proxy_anchor", "softtriple", "normsoftmax", "arcface", "triplet",
          "contrastive", "ntxent", "cross_entropy")
SCHEDULERS = ("cosine", "step", "exponential", "none")
