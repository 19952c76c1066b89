"""The contrastive losses on a batch of 4 hand-written image / caption embeddings (D = 3), printed step by step:
the logits matrix, the labels, each row's cross-entropy, and the loss at three logit scales. The numbers in
docs/contrastive_loss.md are this script's output:  python examples/loss_4x4.py
"""
import math

import torch
import torch.nn.functional as F

from miniclip.loss import ClipLoss, SigLipLoss

torch.set_printoptions(precision=3, sci_mode=False)
# Four images and their four captions; caption i was written for image i. Images 0 and 3 look alike.
image_embeds = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.3, 0.0]]), dim=-1)
text_embeds = F.normalize(torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.2], [0.0, 0.3, 0.9], [0.8, 0.5, 0.1]]), dim=-1)

clip = ClipLoss()
cosine = image_embeds @ text_embeds.T  # (4, 4): row = image, column = caption
print("cosine similarity (rows: images, columns: captions)\n", cosine)
for scale in (1.0, 1 / 0.07, 100.0):
    logit_scale = torch.tensor(scale)
    logits_per_image, logits_per_text, labels = clip.logits(image_embeds, text_embeds, logit_scale)
    print(f"\n=== logit_scale = {scale:.2f} (ln-scale t = {math.log(scale):.3f}) ===")
    print("logits_per_image = logit_scale * cosine\n", logits_per_image)
    print("labels (the matching caption of each image) =", labels.tolist())
    print("softmax over each row (image -> which caption?)\n", logits_per_image.softmax(dim=1))
    image_ce = F.cross_entropy(logits_per_image, labels, reduction="none")  # (4,) = -log p(correct caption)
    text_ce = F.cross_entropy(logits_per_text, labels, reduction="none")  # (4,) = -log p(correct image)
    print("per-image cross-entropy", image_ce, " per-caption cross-entropy", text_ce)
    by_hand = (image_ce.mean() + text_ce.mean()) / 2
    print(f"ClipLoss = {clip(image_embeds, text_embeds, logit_scale).item():.4f}  (by hand: {by_hand.item():.4f}; "
          f"chance level ln 4 = {math.log(4):.4f})")

# SigLIP scores every (image, caption) pair on its own: sigmoid(t * cos + b) should be 1 on the diagonal, 0 elsewhere.
scale, bias = torch.tensor(10.0), torch.tensor(-10.0)  # SigLIP's initial values
print(f"\n=== SigLIP at its init: logit_scale = 10, logit_bias = -10 ===")
print("sigmoid(logit_scale * cosine + logit_bias) = P(pair matches)\n", torch.sigmoid(scale * cosine + bias))
print(f"SigLipLoss = {SigLipLoss()(image_embeds, text_embeds, scale, bias).item():.4f} (summed over the 16 pairs, / 4)")
