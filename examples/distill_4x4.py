"""The distillation losses on a batch of 4 hand-written image / caption embeddings, printed step by step: the
student's and the teacher's similarity rows (each at its own logit scale), their softmax, the per-row KL and
cross-entropy, and affinity / kd / feature. The numbers in docs/distillation.md are this script's output:
    python examples/distill_4x4.py
"""
import torch
import torch.nn.functional as F

from miniclip.distillation import DistillationLoss, feature_loss
from miniclip.loss import ClipLoss

torch.set_printoptions(precision=3, sci_mode=False)
# The student of examples/loss_4x4.py (images 0 and 3 look alike to it) ...
image_embeds = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.3, 0.0]]), dim=-1)
text_embeds = F.normalize(torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.2], [0.0, 0.3, 0.9], [0.8, 0.5, 0.1]]), dim=-1)
# ... and a teacher that tells images 0 and 3 apart (another direction for image / caption 3).
teacher_image_embeds = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, -0.5, 0.7]]), dim=-1)
teacher_text_embeds = F.normalize(torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.9, 0.1], [0.0, 0.2, 0.9], [0.5, -0.4, 0.8]]), dim=-1)
scale, teacher_scale = torch.tensor(10.0), torch.tensor(20.0)

student_i2t, student_t2i, _ = ClipLoss().logits(image_embeds, text_embeds, scale)
teacher_i2t, teacher_t2i, _ = ClipLoss().logits(teacher_image_embeds, teacher_text_embeds, teacher_scale)
print("student logits_per_image (scale 10)\n", student_i2t)
print("teacher logits_per_image (scale 20)\n", teacher_i2t)
p_student, p_teacher = student_i2t.softmax(dim=1), teacher_i2t.softmax(dim=1)
print("student affinity A_s = softmax over each row (image -> which caption?)\n", p_student)
print("teacher affinity A_t\n", p_teacher)
kl_rows = (p_teacher * (p_teacher.log() - p_student.log())).sum(dim=1)  # (4,)
ce_rows = -(p_teacher * p_student.log()).sum(dim=1)  # (4,)
print("per-image KL(A_t || A_s)", kl_rows, " per-image cross-entropy", ce_rows)
print("(row 3: the student splits caption 0 and 3; the teacher puts nearly all mass on caption 3)")
kl_t2i = F.kl_div(student_t2i.log_softmax(1), teacher_t2i.log_softmax(1), log_target=True, reduction="batchmean")
ce_t2i = -(teacher_t2i.softmax(1) * student_t2i.log_softmax(1)).sum(1).mean()
args = (image_embeds, text_embeds, scale, teacher_image_embeds, teacher_text_embeds, teacher_scale)
affinity = DistillationLoss("affinity", 3, 3)(*args)
kd = DistillationLoss("kd", 3, 3)(*args)
print(f"affinity = mean KL image->text + mean KL text->image = {kl_rows.mean():.4f} + {kl_t2i:.4f} = {affinity:.4f}")
print(f"kd = (mean CE image->text + mean CE text->image) / 2 = ({ce_rows.mean():.4f} + {ce_t2i:.4f}) / 2 = {kd:.4f}")
cos = F.cosine_similarity(image_embeds, teacher_image_embeds, dim=-1)
print("cosine(student image i, teacher image i)", cos)
feature = DistillationLoss("feature", 3, 3)(*args)
print(f"feature (cosine) = mean over both towers of 1 - cos = ({feature_loss(image_embeds, teacher_image_embeds):.4f}"
      f" + {feature_loss(text_embeds, teacher_text_embeds):.4f}) / 2 = {feature:.4f}")
