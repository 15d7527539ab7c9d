#User service
from flask import Flask, jsonify

app_user = Flask(__name__)

@app_user.route('/user/<user_id>')
def get_user(user_id):
    # Simuler la récupération des données utilisateur depuis une base de données
    user_data = {
        'user_id': user_id,
        'username': f'user_{user_id}',
        'email': f'user_{user_id}@example.com'
    }
    return jsonify(user_data)

if __name__ == '__main__':
    app_user.run(port=5001)
