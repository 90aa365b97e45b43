"""`cbir info`: describe a database, or list them."""
from __future__ import annotations

import time

from cbir.cli.flags import counted, open_store, store_arguments
from cbir.errors import StoreError
from cbir.store.database import VectorStore, database_names
from cbir.store.redis.connect import connect, describe


def _list_databases(client) -> int:
    names = database_names(client)
    print(f"{counted(len(names), 'database')} on {describe(client)}"
          + ("" if names else ": add images with `cbir add` (add_images.py)"))
    for name in names:
        store = VectorStore(client, name)
        try:
            store.require()
        except StoreError as exc:  # an older schema's layout, say: named, not read
            print(f"  {name:<24} {'?':>9}          {exc}")
            continue
        images = counted(store.count(), "image")
        print(f"  {name:<24} {images:>16}   {store.model_spec.get('description', '?')}")
    return 0


def run(args) -> int:
    from cbir.search.persisted import index_info

    if args.db_name is None:
        return _list_databases(connect(args.redis_url))
    store = open_store(args)
    info = store.describe()
    labels = store.label_counts()
    print(f"database '{info.name}' on {describe(store.client)}")
    print(f"  images: {info.count}   dim: {info.dim}   version: {info.version}")
    print(f"  model: {info.model_spec.get('description', '?')} (fingerprint {info.model})")
    print(f"  created: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.created))}")
    trained = index_info(store)
    if trained:
        print(f"  index: {trained['kind']} {trained['params']}, built at version {trained['version']}, "
              f"{int(trained['bytes']) / 2**20:.1f} MiB, recall@10 {float(trained['recall10'] or 1):.3f}")
    else:
        print("  index: exact search (no trained index; see train_index.py)")
    for label, count in sorted(labels.items()):
        print(f"  {label:<24} {count}")
    return 0


def register(commands) -> None:
    info = commands.add_parser("info", help="describe a database, or list the databases")
    store_arguments(info, db_help="the database to describe (default: list every database on this Redis with its "
                                   "image count and model)")
    info.set_defaults(run=run)
