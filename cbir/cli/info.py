"""`cbir info`: describe a database, or list them."""
from __future__ import annotations

import time

from cbir.cli.flags import counted, store_arguments
from cbir.errors import StoreError


def run(args) -> int:
    from cbir import api

    if args.db_name is None:
        return _list_databases(args.redis_url)
    store = api.open_database(args.db_name, args.redis_url)
    described = api.describe(store)
    info, trained = described.info, described.index
    print(f"database '{info.name}' on {api.where(store)}")
    print(f"  images: {info.count}   dim: {info.dim}   version: {info.version}")
    print(f"  model: {info.model_spec.get('description', '?')} (fingerprint {info.model})")
    print(f"  created: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.created))}")
    if trained:
        print(f"  index: {trained['kind']} {trained['params']}, built at version {trained['version']}, "
              f"{int(trained['bytes']) / 2**20:.1f} MiB, recall@10 {float(trained['recall10'] or 1):.3f}")
    else:
        print("  index: exact search (no trained index; see train_index.py)")
    for label, count in sorted(described.labels.items()):
        print(f"  {label:<24} {count}")
    return 0


def _list_databases(redis_url: str | None) -> int:
    from cbir import api

    databases = api.list_databases(redis_url)
    print(f"{counted(len(databases.stores), 'database')} on {databases.where}"
          + ("" if databases.stores else ": add images with `cbir add` (add_images.py)"))
    for store in databases.stores:
        try:
            store.require()
        except StoreError as exc:  # an older schema's layout, say: named, not read
            print(f"  {store.name:<24} {'?':>9}          {exc}")
            continue
        images = counted(store.count(), "image")
        print(f"  {store.name:<24} {images:>16}   {store.model_spec.get('description', '?')}")
    return 0


def register(commands) -> None:
    info = commands.add_parser("info", help="describe a database, or list the databases")
    store_arguments(info, db_help="the database to describe (default: list every database on this Redis with its "
                                   "image count and model)")
    info.set_defaults(run=run)
