#!/usr/bin/env bash
# Regenerates the small test recordings in tests/data/ from synthetic speech.
#
# Needs espeak-ng, sox and ffmpeg. Idempotent: every output is rewritten from scratch.
# Deterministic-ish: espeak-ng is deterministic, sox runs in repeatable mode (-R, fixed seed for
# the noise generator) without dither (-D), and ffmpeg writes bitexact containers without
# metadata; encoder versions can still change the compressed bytes slightly.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/../tests/data}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

SOX=(sox -R -D -V1)
FF=(ffmpeg -nostdin -hide_banner -loglevel error -y)
# Bitexact + no metadata, so reruns do not differ by encoder version strings or timestamps.
BITEXACT=(-fflags +bitexact -flags:a +bitexact -map_metadata -1)

# One utterance, 16 kHz mono s16, with espeak-ng's leading/trailing silence trimmed.
say() { # $1 = output, $2 = voice, $3 = text
    espeak-ng -v "$2" -s 175 -w "$work/raw.wav" "$3"
    "${SOX[@]}" "$work/raw.wav" -r 16000 -c 1 -b 16 "$1" \
        silence 1 0.02 0.5% reverse silence 1 0.02 0.5% reverse
}
silence() { # $1 = output, $2 = seconds
    "${SOX[@]}" -n -r 16000 -c 1 -b 16 "$1" trim 0 "$2"
}

say "$work/u1.wav" en-us "Hello, how are you?"
say "$work/u2.wav" en-us "Streaming audio is fun."
say "$work/u3.wav" en-us "Please call me tomorrow."
say "$work/u4.wav" en-gb+f3 "See you later today."
silence "$work/s05.wav" 0.5
silence "$work/s15.wav" 1.5

# speech.wav: 0.5 s silence, three utterances 1.5 s apart, 0.5 s silence.
"${SOX[@]}" "$work/s05.wav" "$work/u1.wav" "$work/s15.wav" "$work/u2.wav" "$work/s15.wav" \
    "$work/u3.wav" "$work/s05.wav" "$work/speech_tmp.wav"
"${FF[@]}" -i "$work/speech_tmp.wav" "${BITEXACT[@]}" -c:a pcm_s16le "$out/speech.wav"

speech="$out/speech.wav"
"${FF[@]}" -i "$speech" "${BITEXACT[@]}" -c:a flac "$out/speech.flac"
"${FF[@]}" -i "$speech" "${BITEXACT[@]}" -c:a libmp3lame -b:a 32k "$out/speech.mp3"
"${FF[@]}" -i "$speech" "${BITEXACT[@]}" -c:a libopus -b:a 24k "$out/speech.ogg"
"${FF[@]}" -i "$speech" "${BITEXACT[@]}" -c:a libopus -b:a 24k "$out/speech.webm"
"${FF[@]}" -i "$speech" "${BITEXACT[@]}" -c:a aac -b:a 32k -movflags +faststart "$out/speech.m4a"
"${FF[@]}" -i "$speech" "${BITEXACT[@]}" -c:a aac -b:a 32k "$out/speech_moov_end.m4a"

# Raw PCM: 8 kHz stereo s16le with the speech on channel 0 and silence on channel 1.
"${SOX[@]}" "$speech" -r 8000 "$work/speech8k.wav"
"${SOX[@]}" -M "$work/speech8k.wav" "|sox -R -D -V1 $work/speech8k.wav -p vol 0" \
    -t raw -e signed-integer -b 16 -L "$out/speech_s16le_8k_stereo.raw"
# High-rate files would be > 1 MB at full length, so they hold an excerpt: speech.wav from
# EXCERPT_START for EXCERPT_LEN seconds (0.15 s silence, the first utterance, some silence).
EXCERPT_START=0.35
EXCERPT_LEN=1.35
"${SOX[@]}" "$speech" "$work/excerpt.wav" trim "$EXCERPT_START" "$EXCERPT_LEN"
"${SOX[@]}" "$work/excerpt.wav" -r 48000 -t raw -e floating-point -b 32 -L \
    "$out/speech_f32le_48k.raw"
"${SOX[@]}" "$work/excerpt.wav" -r 44100 -c 2 "$work/speech44k.wav"
"${FF[@]}" -i "$work/speech44k.wav" "${BITEXACT[@]}" -c:a pcm_s16le "$out/speech_44k_stereo.wav"

# Non-speech.
"${SOX[@]}" -n -r 16000 -c 1 -b 16 "$work/noise.wav" synth 3 whitenoise vol 0.02
"${FF[@]}" -i "$work/noise.wav" "${BITEXACT[@]}" -c:a pcm_s16le "$out/noise.wav"
"${FF[@]}" -f lavfi -i anullsrc=r=16000:cl=mono -t 3 "${BITEXACT[@]}" -c:a pcm_s16le \
    "$out/silence.wav"
"${FF[@]}" -f lavfi -i testsrc=size=64x48:rate=10 -t 1 "${BITEXACT[@]}" -an \
    -c:v mpeg4 -q:v 10 "$out/video_only.mp4"

# Two speakers: channel 0 speaks at 0.5 s, channel 1 (another voice) at 3 s; 4.4 s in all.
"${SOX[@]}" "$work/s05.wav" "$work/u1.wav" "$work/ch0.wav" pad 0 5 trim 0 4.4
"${SOX[@]}" "$work/u4.wav" "$work/ch1.wav" pad 3 5 trim 0 4.4
"${SOX[@]}" -M "$work/ch0.wav" "$work/ch1.wav" "$work/two.wav"
"${FF[@]}" -i "$work/two.wav" "${BITEXACT[@]}" -c:a pcm_s16le "$out/stereo_two_speakers.wav"

echo "written to $out:"
for f in speech.wav speech.flac speech.mp3 speech.ogg speech.webm speech.m4a \
    speech_moov_end.m4a speech_44k_stereo.wav noise.wav silence.wav video_only.mp4 \
    stereo_two_speakers.wav; do
    d="$(ffprobe -v error -show_entries format=duration -of csv=p=0 "$out/$f")"
    printf '  %-28s %8s s %7s bytes\n' "$f" "$d" "$(stat -c %s "$out/$f")"
done
raw_s16="$(stat -c %s "$out/speech_s16le_8k_stereo.raw")"
raw_f32="$(stat -c %s "$out/speech_f32le_48k.raw")"
printf '  %-28s %8s s %7s bytes\n' speech_s16le_8k_stereo.raw \
    "$(echo "scale=6; $raw_s16 / (8000 * 2 * 2)" | bc)" "$raw_s16"
printf '  %-28s %8s s %7s bytes\n' speech_f32le_48k.raw \
    "$(echo "scale=6; $raw_f32 / (48000 * 4)" | bc)" "$raw_f32"
for i in 1 2 3; do
    printf '  utterance %d: %s s\n' "$i" "$(soxi -D "$work/u$i.wav")"
done
