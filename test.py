#!/usr/bin/env python
"""Evaluate or probe a CLIP checkpoint (not the test suite: that is tests/).

  python test.py --checkpoint out/ --image dog.png --texts "a dog" "a cat" "a fish" "a pig"
  python test.py --checkpoint out/ --eval_file data/en_test.json --save_features feats/
  python test.py --checkpoint out/ --zeroshot_dir cifar10-test/ [--class_map names.json]
  python test.py args.json   (the same arguments as a JSON / YAML file)

`python test.py --help` lists the arguments; the code is miniclip/apps/evaluate.py.
"""
from miniclip.apps.evaluate import cli

if __name__ == "__main__":
    cli()
