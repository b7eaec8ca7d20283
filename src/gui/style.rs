//! Fonts, colours and the words that explain each metric.

use egui::{Color32, FontData, FontDefinitions, FontFamily};

/// A subset of Noto Sans CJK JP (SIL OFL 1.1; see assets/fonts/README.md) so Japanese renders.
const CJK_FONT: &[u8] = include_bytes!("../../assets/fonts/NotoSansCJKjp-Regular-subset.otf");

/// egui's own fonts first, the CJK subset as the fallback for what they lack.
pub fn install_fonts(ctx: &egui::Context) {
    let mut fonts = FontDefinitions::default();
    fonts.font_data.insert(
        "noto-sans-jp".into(),
        std::sync::Arc::new(FontData::from_static(CJK_FONT)),
    );
    for family in [FontFamily::Proportional, FontFamily::Monospace] {
        fonts
            .families
            .entry(family)
            .or_default()
            .push("noto-sans-jp".into());
    }
    ctx.set_fonts(fonts);
}

pub fn apply_theme(ctx: &egui::Context, dark: bool) {
    ctx.set_visuals(if dark {
        egui::Visuals::dark()
    } else {
        egui::Visuals::light()
    });
    ctx.style_mut(|s| {
        s.spacing.item_spacing = egui::vec2(8.0, 6.0);
        s.spacing.button_padding = egui::vec2(8.0, 3.0);
    });
}

/// Colour of an activation `value` on a scale whose top is `max`: transparent at 0, the
/// accent colour at `max` (negative values in the second colour).
pub fn activation_colour(value: f32, max: f32, dark: bool) -> Color32 {
    if !value.is_finite() || max <= 0.0 {
        return Color32::TRANSPARENT;
    }
    let t = (value.abs() / max).clamp(0.0, 1.0);
    let (r, g, b) = if value >= 0.0 {
        (255, 140, 0)
    } else {
        (60, 130, 255)
    };
    let alpha = (t * if dark { 200.0 } else { 170.0 }) as u8;
    Color32::from_rgba_unmultiplied(r, g, b, alpha)
}

/// The colour map of heatmaps: dark blue → yellow (viridis-like), `t` in [0, 1].
pub fn heat_colour(t: f32) -> Color32 {
    const STOPS: [(f32, [u8; 3]); 5] = [
        (0.0, [68, 1, 84]),
        (0.25, [59, 82, 139]),
        (0.5, [33, 145, 140]),
        (0.75, [94, 201, 98]),
        (1.0, [253, 231, 37]),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    for pair in STOPS.windows(2) {
        let ((t0, a), (t1, b)) = (pair[0], pair[1]);
        if t <= t1 {
            let f = (t - t0) / (t1 - t0);
            let mix = |i: usize| (a[i] as f32 + f * (b[i] as f32 - a[i] as f32)) as u8;
            return Color32::from_rgb(mix(0), mix(1), mix(2));
        }
    }
    Color32::from_rgb(253, 231, 37)
}

/// The colour map of signed heatmaps, `t` in [−1, 1]: blue below 0, the background's tone at
/// 0, red above (a diverging map like ColorBrewer's RdBu, which TransformerLens's patching
/// plots use; on the dark theme its middle is dark, so that near-zero cells recede as they do
/// on the light one), so that a cell that moves a metric the wrong way shows as clearly as
/// one that moves it the right way.
pub fn diverging_colour(t: f32, dark: bool) -> Color32 {
    let (below, middle, above) = if dark {
        ([67, 147, 235], [40, 40, 40], [235, 80, 60])
    } else {
        ([33, 102, 172], [247, 247, 247], [178, 24, 43])
    };
    let t = if t.is_finite() {
        t.clamp(-1.0, 1.0)
    } else {
        0.0
    };
    let end = if t < 0.0 { below } else { above };
    let f = t.abs();
    let mix = |c: usize| (middle[c] as f32 + f * (end[c] as f32 - middle[c] as f32)).round() as u8;
    Color32::from_rgb(mix(0), mix(1), mix(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diverging_map_is_neutral_at_its_centre_and_saturates_at_its_ends() {
        for dark in [false, true] {
            let middle = diverging_colour(0.0, dark);
            assert_eq!(diverging_colour(f32::NAN, dark), middle);
            assert_eq!(diverging_colour(7.0, dark), diverging_colour(1.0, dark));
            assert_eq!(diverging_colour(-7.0, dark), diverging_colour(-1.0, dark));
            let (red, blue) = (diverging_colour(1.0, dark), diverging_colour(-1.0, dark));
            assert!(red.r() > red.b() && blue.b() > blue.r(), "{dark}");
            // Halfway out, halfway between the middle and the end.
            let half = diverging_colour(0.5, dark);
            for (h, (m, e)) in half.to_array()[..3]
                .iter()
                .zip(middle.to_array()[..3].iter().zip(&red.to_array()[..3]))
            {
                let expected = (*m as f32 + *e as f32) / 2.0;
                assert!((*h as f32 - expected).abs() <= 0.5, "{dark}: {half:?}");
            }
        }
        // The middle recedes into either theme's background.
        assert!(diverging_colour(0.0, true).r() < 64 && diverging_colour(0.0, false).r() > 230);
    }
}

/// Tooltips: what each metric means, with the formula the code uses.
pub mod explain {
    pub const L0: &str = "L0: the mean number of latents active per token.";
    pub const FVU: &str = "FVU (fraction of variance unexplained) = Σ‖x − x̂‖² / Σ‖x − x̄‖², \
        pooled over the batch. 0 is a perfect reconstruction, 1 is no better than the mean.";
    pub const DEAD: &str = "Dead: the share of latents that have not fired in the last N tokens \
        (N = dead-after tokens).";
    pub const LOSS: &str = "Training loss: reconstruction MSE plus the sparsity or AuxK term.";
    pub const TOKENS_PER_S: &str = "Activation rows trained on per second.";
    pub const DENSE: &str = "Dense: the share of latents firing on more than 10% of tokens.";
    pub const CE_RECOVERED: &str = "CE loss recovered = (CE_zero-ablated − CE_with_SAE) / \
        (CE_zero-ablated − CE_clean): the share of the model's next-token loss kept when the \
        hook's value is replaced by the SAE's reconstruction (100% = as good as clean).";
    pub const TRANSCODER: &str = "An SAE reconstructs the hook it reads. A transcoder \
        (Dunefsky et al. 2024) reads one hook and predicts a later one — usually an MLP's \
        input and its output — so its features stand in for the MLP's computation; its FVU \
        is against the hook it predicts.";
    pub const CROSS_LAYER: &str = "A cross-layer transcoder (CLT) has features in every layer: \
        each reads its layer's residual stream (hook_resid_mid) and writes its own MLP's output \
        and every later MLP's, so one feature can stand for what several MLPs compute. \
        Attribution graphs through a CLT need fewer features than through one transcoder per \
        layer. Saved in circuit-tracer's format; the Circuits panel traces through it.";
    pub const REPLACEMENT_MODEL: &str = "Runs held-out text (the world corpus generated \
        with another seed) through the model with every MLP output the transcoders write \
        replaced by their prediction at once, errors compounding from layer to layer: the \
        share of the loss that zeroing those outputs costs which the features recover, the KL \
        from the model's next-token distribution, and how often both pick the same next \
        token. Hover the result for each layer's FVU and L0 (open loop, from the model's own \
        inputs).";
    pub const CONCEPT_F1: &str = "The best single feature's F1 at detecting the concept \
        (\"the feature is above its threshold\" against \"the token has the concept\"), \
        with feature and threshold chosen on one generated split and F1 measured on another. \
        F1 = 2·precision·recall / (precision + recall). Issue 5 asks a mean of 0.8.";
    pub const DENSE_PROBE: &str = "A logistic regression of the hook's standardised \
        activations per concept, fitted on the first split and scored on the second: what a \
        linear read-out of the hook reaches. A concept the probe finds and no single feature \
        does is one the SAE spread over several features, or does not represent as such \
        (the k-sparse probes tell which).";
    pub const SPARSE_PROBE: &str = "k-sparse probe (SAEBench): a logistic regression on the k \
        latents whose mean activation differs most between the concept's tokens and the rest. \
        The k at which it nears the dense probe says over how many latents the concept is \
        spread. A probe may learn that a latent's silence means the concept: for a frequent \
        concept (lang:ja) that alone scores the F1 of calling every token positive.";
    pub const ABSORPTION: &str = "Feature absorption (Chanin et al. 2024; SAEBench's \
        rule): on the held-out tokens with the concept that its dense probe finds, the share of \
        the activation's projection on the probe direction that latents other than the main \
        ones (best and split features) carry — latents aligned with the probe (cosine ≥ 0.1), \
        the three largest — instead of the main features. Fully absorbed: the main features \
        are silent and one latent (cosine ≥ 0.025) carries at least 40%. A continent absorbed \
        into an \"Africa\" latent is the textbook case. The probe's direction is a \
        discriminative fit that may lean on directions of little variance, so the same rule is \
        also run along the concept's mean difference (mean activation on it minus off it).";
    pub const TRANSCODER_SET: &str = "A transcoder folder, or a folder of them (one per \
        layer), that writes each layer's blocks.L.hook_mlp_out, or a cross-layer transcoder \
        (circuit-tracer's W_enc_L / W_dec_L files, or Gemma Scope 2's params_layer_L). Layers \
        without one keep their whole MLP output in error nodes.";
    pub const NODE_THRESHOLD: &str = "Pruning keeps the most influential nodes that together \
        hold this share of the influence on the logits (tokens and logits always); \
        circuit-tracer's default is 0.8.";
    pub const EDGE_THRESHOLD: &str = "Pruning then keeps the edges that hold this share of the \
        edge influence among the kept nodes; circuit-tracer's default is 0.98.";
    pub const REPLACEMENT_SCORE: &str = "Replacement score (circuit-tracer): the share of the \
        tokens' and error nodes' influence on the logits that is the tokens'. 1 when every path \
        from the prompt to the logits runs through transcoder features.";
    pub const COMPLETENESS_SCORE: &str = "Completeness score (circuit-tracer): the share of \
        each node's inputs that do not come from error nodes, weighted by the node's influence \
        on the logits.";
    pub const ATTRIBUTION_EDGE: &str = "An edge is its source's direct, linear effect on its \
        target in the prompt's local replacement model (attention patterns and norm divisors \
        frozen): the source's value times the gradient along the path. Red raises the target \
        (a feature's pre-activation, or a logit less the mean logit), blue lowers it.";
    pub const FEATURE_INTERVENTION: &str = "Set features of the graph to new activations and \
        rerun the prompt: each change adds (new − old)·W_dec[f] to its layer's MLP output at \
        its token, and the real model runs on from there (attention, norms and later MLPs \
        respond; the graph holds them fixed, so its edges predict only the direct part).";
    pub const SUPERNODES: &str = "Group nodes that play one part in the circuit (\"say a \
        capital\") under a name: each group's summed direct effect on the logits and on the other \
        groups is listed, the group can be ablated at once, and the saved graph file carries the \
        groups for Neuronpedia's viewer.";
    pub const GRAPH_FILE: &str = "Write the pruned graph as circuit-tracer's graph file \
        (JSON), which its local viewer and Neuronpedia's circuit viewer open; the folder's \
        graph-metadata.json index is updated too. An existing file is not replaced. A \
        relative path is taken from the folder monoscope was started in; the message after \
        saving names the whole path.";
    pub const ERROR_NODE: &str = "An error node is what the layer's transcoder fails to \
        predict of the MLP's output at that token, kept so the graph reproduces the model \
        exactly; its edges are paths the features do not explain.";
    pub const FEATURE_LOGIT_EFFECTS: &str = "The feature's decoder row pushed straight to the \
        logits through the final norm's gain and the unembedding (the direct path only: later \
        layers may change what it does).";
    pub const DELTA_LM: &str = "ΔLM loss = CE_with_SAE − CE_clean, nats per token.";
    pub const DENSITY: &str = "Density: the fraction of tokens on which the feature fires.";
    pub const MAX_ACT: &str = "The largest activation seen over the statistics' tokens.";
    pub const ES: &str = "Efficacy (ES): the edit prompt now puts the new target above the old \
        answer.";
    pub const PS: &str = "Paraphrase success (PS): the same on other phrasings of the fact.";
    pub const NS: &str = "Neighbourhood success (NS): other subjects still give their own, \
        unedited answers.";
    pub const ATTRIBUTION: &str = "Integrated gradients (Dai et al. 2022): the neuron's \
        activation times the mean gradient of P(target) as the activation is scaled from 0 \
        to its value.";
    pub const TUNED_LENS: &str = "Tuned lens (Belrose et al. 2023): each depth's stream goes \
        through a learned affine translator before the final norm and the unembedding, trained so \
        that its prediction matches the model's (KL); the logit lens is the untrained one. Early \
        layers speak another basis than the unembedding, which the translators learn.";
    pub const LOGIT_LENS: &str = "Logit lens (nostalgebraist 2020): the residual stream after \
        each block, at each token, put through the final norm and the unembedding, as if the \
        model stopped there. Each cell shows the most likely next token read at that depth.";
    pub const DLA: &str = "Direct logit attribution: the last stream is the sum of the \
        embeddings and every attention and MLP output, so the logit splits into one term per \
        component (the final norm linearised at the whole stream's scale, plus its bias). \
        Direct path only: what later blocks make of a component's output counts for them.";
    pub const DLA_HEADS: &str = "Each attention output split per head: the head's slice of \
        attn.hook_z through its slice of the output projection, read like the terms above. \
        A head that moves the logit directly (a name mover) shows here; one that acts through \
        later blocks does not.";
    pub const COMPOSITION: &str = "Composition scores from the weights alone (Elhage et \
        al. 2021): how much of what an earlier head writes (its OV matrix) a later head reads \
        into its queries (Q), its keys (K: previous-token heads feeding induction heads) or its \
        values (V), as ‖OV·M‖ / (‖OV‖·‖M‖) with the norms folded in as TransformerLens does. \
        A reader at random to its writer scores about 1/√d_model.";
    pub const HEAD_DETECTORS: &str = "A detector names, for each query, the keys a head \
        with one known job would attend to: the previous token; the first token (a sink where \
        idle heads park); earlier copies of the current token (duplicate-token heads); the \
        token right after an earlier copy (induction heads). A head's score is its mean \
        attention on those keys over the queries the detector counts, from 0 to 1.";
    pub const INDUCTION_PROBE: &str = "A start token, 20 random tokens, then the same 20 \
        again: in the second copy nothing but \"what followed this token last time\" predicts \
        the next token, so a head that attends there is an induction head.";
    pub const HEAD_ABLATION: &str = "The head's attn.hook_z columns set to zero at every \
        token, and the model's mean next-token loss measured again: how much the model leans on \
        this head here (positive: it was helping). Where a head looks is not whether it \
        matters.";
    pub const ATTENTION_PATTERN: &str = "attn.hook_pattern: row q is how query token q \
        splits its attention over the keys at or before it (each row sums to 1).";
    pub const HEAD_RECOVERY: &str = "The same corrupted runs with one attention head's \
        output (its attn.hook_z columns) restored from the clean run at every token: which \
        heads carry what the corrupted subject took away. Coloured on P(clean)'s scale, so a \
        head that brings little back stays dark.";
    pub const DLA_TARGET: &str = "The continuation whose first token's logit is attributed \
        (\" Tokyo\", with its leading space); empty: the model's own prediction.";
    pub const DENOISING: &str = "Denoising: one activation of the clean run copied into \
        the corrupted run. A cell near 1 is enough on its own to bring the clean answer back.";
    pub const NOISING: &str = "Noising: one activation of the corrupted run copied into the \
        clean run. A cell near 0 is one the clean answer cannot do without.";
    pub const PATCHING_SCALE: &str = "The metric is logit(answer) − logit(wrong answer) at the \
        last token, rescaled so that the corrupted run scores 0 and the clean run 1: \
        (patched − corrupted) / (clean − corrupted). Red cells lie above the unpatched run, \
        blue ones below it.";
    pub const PATH_PATCHING: &str = "Path patching (Wang et al. 2022): each head's output is \
        patched alone while every other head keeps its output from the run patched into, so \
        its effect reaches only the receivers: the logits (its direct effect, and through later \
        MLPs), or the query (q), key (k) or value (v) input of later heads, written \
        LAYER.HEAD:q, comma-separated (MLPs between sender and receiver are recomputed, so \
        paths through them count; under grouped-query attention a k or v receiver is its key \
        head, which its whole group reads).";
    pub const ATTRIBUTION_PATCHING: &str = "Attribution patching (Nanda 2023): every cell \
        estimated at once as (source − base) · ∂metric/∂activation, from one backward pass \
        through the run patched into. Exact for a linear metric; it underestimates cells where \
        the logit difference saturates.";
    pub const FEATURE_PATCHING: &str = "Activation patching in the SAE's basis: one \
        feature's change between the runs (its decoder direction times the change in its \
        activation) added at one token, everything else as it was. Every feature at every \
        token is estimated by attribution patching; the strongest are patched for real.";
    pub const RECOVERY: &str = "Causal tracing (Meng et al. 2022): the subject's embeddings are \
        corrupted with noise; restoring one state from the clean run brings P(answer) back by \
        this much.";

    /// What one patching site's cells are.
    pub fn patching_site(site: crate::patching::Site) -> &'static str {
        use crate::patching::Site;
        match site {
            Site::ResidPre => {
                "blocks.L.hook_resid_pre: the residual stream entering block L \
                at one token (everything the earlier blocks wrote there)"
            }
            Site::AttnOut => "blocks.L.hook_attn_out: block L's attention output at one token",
            Site::MlpOut => "blocks.L.hook_mlp_out: block L's MLP output at one token",
            Site::Heads => {
                "blocks.L.attn.hook_z: one head's output at every token; click a \
                head to see its attention pattern"
            }
            Site::Queries => {
                "blocks.L.attn.hook_q: what one head looks for, at every token; where it \
                looks moves with it. Click a head to see its attention pattern"
            }
            Site::Keys => {
                "blocks.L.attn.hook_k: what the tokens offer to one key head's queries, at every \
                token (with grouped-query attention a key head serves several heads). Click one \
                to see the first of its heads' patterns"
            }
            Site::Values => {
                "blocks.L.attn.hook_v: what the tokens pass on through one key head when \
                attended to, at every token; where the heads look stays. Click one to see the \
                first of its heads' patterns"
            }
            Site::Patterns => {
                "blocks.L.attn.hook_pattern: where one head looks, at every query; its \
                values as they were. Click a head to see its attention pattern"
            }
            Site::HeadsByPos => {
                "blocks.L.attn.hook_z: one head's output at one token; click a row to \
                see the head's attention pattern"
            }
            Site::QueriesByPos => {
                "blocks.L.attn.hook_q: what one head looks for from one token; click a row \
                to see the head's attention pattern"
            }
            Site::KeysByPos => {
                "blocks.L.attn.hook_k: what one token offers to one key head's queries; click \
                a row to see the first of its heads' patterns"
            }
            Site::ValuesByPos => {
                "blocks.L.attn.hook_v: what one token passes on through one key head; click a \
                row to see the first of its heads' patterns"
            }
            Site::PatternsByPos => {
                "blocks.L.attn.hook_pattern: where one head looks from one query token; \
                click a row to see the head's attention pattern"
            }
        }
    }
}
